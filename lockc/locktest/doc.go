// Package locktest is the conformance suite for lockc engines
// (specs/locks.md §6): every engine runs the same sub-tests through Run, and
// the same benchmarks through BenchmarkCachedConvert, BenchmarkUncached and
// BenchmarkPingPong.
//
// What the suite checks, each as one sub-test: the compatibility matrix; the
// refusal of bad requests; grant order (arrival order, conversions before
// new requests, conversions in place, QueueConvert, NoOrder, Expedite,
// NoQueue leaving no residue); blocking notifications (who gets them, with
// which mode, how often); the LVB's direction, its Unknown and Invalid
// states, InvalidateLVB; fencing tokens where the engine offers them
// (lockc.Tokener); crashes and Close; cancelled requests and conversions,
// including a cancel that races the grant; conversion deadlock and ErrBusy;
// the OnLost and IsLost ordering where an engine offers them; lockspace
// isolation and arbitrary resource names; a linearizability check of a
// counter cached in the LVB while nodes crash, on a disk that refuses stale
// holders by token or, for an engine without tokens, by the holder's loss
// of its lockspace (OnLost);
// and a soak that ends with nothing left behind.
//
// What a harness supplies: a Harness with a Name and a NewCluster function
// that returns a fresh Cluster (node engines sharing state with no other
// cluster) and registers its own cleanup. Some sub-tests need more than the
// lockc interfaces: crashing a node (Crasher), knowing that a request has
// reached its queue (QueueWaiter), and counting remembered resources
// (ResourceCounter). A cluster that does not implement one of these skips
// the sub-tests (or the checks) that need it. Every sub-test is bounded by a
// timeout, so a hang fails instead of blocking the test binary.
package locktest
