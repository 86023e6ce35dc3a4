// Package persistenttest gives the exception-store conformance suite
// (exstore/storetest) what the kernel's "P" layout implies, for every store
// that keeps its metadata in that format: the persistent store itself and
// the stores that wrap it (clusterized). Every figure comes from the format
// spec, written here independently of package persistent (capacity by
// running the kernel's allocator), so that the suite never checks the
// store against its own arithmetic.
package persistenttest
