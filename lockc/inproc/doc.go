// Package inproc is lockc's in-process lock engine: the embedded default for
// a single host (New), and a simulated cluster of several nodes with crashes
// (NewCluster, Cluster.Crash) for tests of clustered code. It passes the
// conformance suite of package lockc/locktest.
//
// Locking: all nodes of a Cluster share one table of lockspaces guarded by
// one mutex, and every request, conversion, unlock, close and crash is
// decided while that mutex is held, so each decision sees one consistent
// state. The engine starts no goroutines: a waiting caller blocks on a
// channel that the engine closes when its request completes, and blocking
// notifications are sent on a one-slot channel without ever blocking.
// OnLost functions registered before the loss run under the mutex.
//
// The rules are the Linux DLM's (specs/locks.md §1), including its LVB table
// (dlm_lvb_operations). Where the DLM leaves room, this engine promises:
//   - A resource is forgotten as soon as no lock (granted, converting or
//     waiting) remains on it; the next lock reads a zero LVB in state
//     LVBUnknown. (The DLM keeps an unused resource for a while.)
//   - Tokens come from one counter per Cluster, so a resource's token keeps
//     increasing even across being forgotten.
//   - Close is an orderly unlock of every lock: PW and EX locks publish their
//     staged LVB (or invalidate it, after InvalidateLVB). Crash publishes
//     nothing and marks the LVB invalid where the node held PW or EX.
//   - Blocking notifications go to every lock holding a granted mode that is
//     incompatible with a queued request, including locks that are
//     themselves waiting to convert (they still hold their granted mode).
//   - After a crash a node may open lockspaces again, as a restarted node.
//   - LVB() of a lock reports LVBValid after SetLVB and LVBInvalid after
//     InvalidateLVB (what the next publish would write).
//   - As in the DLM, a PW or EX lock that leaves PW/EX without SetLVB or
//     InvalidateLVB republishes the copy it read, and marks it valid.
//   - A cancelled request whose grant won the race is undone without
//     publishing. The one exception is a PR↔CW conversion after which
//     another lock was granted a mode compatible with the new mode but not
//     the old one: going back is impossible, so Convert reports success.
//   - Unlock never waits and ignores its context.
package inproc
