// Package etcdtest runs etcd servers for tests: embedded members (the
// etcd server's own code, in the test's process), alone or as a cluster
// whose members can be stopped, and clusters of processes of the etcd
// binary a distribution ships (a server built by someone else) on loopback,
// whose members can be killed. It also has a Proxy between
// one client and etcd that can cut the connection (freeze it without
// closing it, as a partition does), heal it, or delay it; and LockCluster,
// a locktest.Cluster (and Crasher) of lock engines on such a server that
// any package's tests and benchmarks can use. LockCluster takes a function
// that makes the engines, as this package cannot import lockc/etcd (whose
// own tests import this package).
//
// Every server lives in its own temporary directory and is stopped at the
// test's cleanup. Clients reach embedded members on unix sockets, except
// StartTLS's member, which serves them TLS on 127.0.0.1 with an
// internal/testpki CA's certificates and requires client certificates of
// that CA; members talk to each other, and the binary listens, on
// 127.0.0.1 only. Only tests import this package: the etcd server does not
// link into snapd.
package etcdtest
