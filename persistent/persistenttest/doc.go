// Package persistenttest gives the exception-store conformance suite
// (exstore/storetest) what the kernel's "P" layout implies, for every store
// that keeps its metadata in that format: the persistent store itself and
// the stores that wrap it (clusterized). It derives every figure from
// persistent.Geometry, so the suite's expectations follow the layout the
// store writes.
package persistenttest
