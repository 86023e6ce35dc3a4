// Package etcdtest runs etcd servers for tests: embedded members (the
// etcd server's own code, in the test's process) on unix sockets, alone
// or as a cluster whose members can be stopped, and the etcd binary a
// distribution ships (a server built by someone else) on loopback; and
// LockCluster, a locktest.Cluster (and Crasher) of lock engines on such a
// server that any package's tests and benchmarks can use. LockCluster takes
// a function that makes the engines, as this package cannot import
// lockc/etcd (whose own tests import this package).
//
// Every server lives in its own temporary directory and is stopped at the
// test's cleanup. Nothing here listens on anything but unix sockets and
// 127.0.0.1. Only tests import this package: the etcd server does not link
// into snapd.
package etcdtest
