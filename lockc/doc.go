// Package lockc is clustersnap's lock client: DLM-style locks on named
// resources inside lockspaces, with the Linux DLM's six modes, grant order,
// conversions, a 32-byte lock value block (LVB), blocking notifications,
// fencing tokens and node-failure signalling.
//
// The API is engine-neutral. An Engine opens lockspaces for one node; the
// in-process engine (package lockc/inproc) is the embedded default for one
// host and can also simulate several nodes and their crashes in one process.
// Every engine must pass the conformance suite of package lockc/locktest.
// The semantics are the DLM's (specs/locks.md §1); every engine promises:
//
// Modes. NL < CR < CW < PR < PW < EX, with the DLM's symmetric compatibility
// matrix (Compatible). Covers says when a held mode gives at least the
// access of another, so a client may serve a local request from a lock it
// already holds.
//
// Grant order. A request is granted only when compatible with every granted
// mode on the resource, including the granted modes of locks waiting to
// convert. Waiting conversions are granted before waiting new requests;
// each queue is granted in arrival order, and nothing is granted past a
// blocked head of its queue. NoQueue fails at once with ErrWouldBlock
// instead of waiting; NoOrder grants as soon as compatible; Expedite grants
// a new NL request at once.
//
// Conversions. A down-conversion (and a same-mode conversion) is granted at
// once. An up-conversion (a stronger mode, or PR→CW) is granted in place
// when compatible, unless QueueConvert asks it to queue behind the waiting
// conversions; otherwise it waits ahead of new requests. An up-conversion
// that would wait behind a queued conversion its own granted mode blocks
// fails with ErrDeadlock and keeps its old mode. A lock runs one operation
// at a time: a second one while the first waits fails with ErrBusy.
//
// Context. Lock and Convert block until granted or until ctx ends. When ctx
// ends first they return an error wrapping ctx.Err() and leave nothing
// changed: no new lock is held, a conversion keeps its old mode, nothing is
// published. Unlock never waits.
//
// LVB. Every lock carries the resource's LVB (the DLM's VALBLK is always
// set), moved as the DLM's dlm_lvb_operations table says. It is written from
// the lock to the resource when the lock leaves PW or EX: any conversion
// from EX, any conversion from PW except to EX, and unlock. It is read into
// the lock on a new grant and on every other conversion to the same or a
// higher mode (in the order NL..EX; PR→CW reads nothing).
// SetLVB and InvalidateLVB stage what the next write publishes; a PW or EX
// lock that stages nothing republishes the copy it read. A fresh resource's
// LVB is zeros in state LVBUnknown; it becomes LVBInvalid when a PW or EX
// holder's node dies or a holder invalidates it, until the next publish.
// An engine may be stricter: report LVBInvalid in more cases (the kernel
// DLM does when a new master rebuilds a resource after a node failure) and
// keep a resource's value after its last lock is released instead of
// forgetting it. It never reports LVBValid for anything but the last value
// published. Users treat Invalid and Unknown as "re-read the truth", which
// is always safe.
//
// Blocking notifications. A lock whose granted mode keeps a queued request
// waiting receives that request's mode on Blocking. Notifications are
// coalesced to the highest mode, repeated only for a higher mode until the
// lock is granted again, never block the engine, and the channel is never
// closed.
// NoQueue requests send none.
//
// Tokens. An engine that numbers grants cluster-wide offers the optional
// Tokener capability: a fencing token that increases with every grant and
// up-conversion on a resource, across all nodes, so storage that remembers
// the highest token it has seen can refuse a write from a stale holder. An
// engine without it (the kernel DLM) fences through Loss alone.
//
// Loss. A node loses a lockspace when it is evicted, its lease expires, it
// crashes or it closes it: all its locks are gone at once and the I/O they
// protected must stop. Lost is closed and Err wraps ErrLost; pending
// requests fail with ErrLost and operations on its locks with ErrUnlocked.
// Two optional capabilities make the loss cheap to check on every I/O:
// LostChecker.IsLost (true before Lost is closed) and LostNotifier.OnLost
// (called before IsLost turns true, before Lost is closed, and before
// another node can be granted a lock the lost node held).
//
// Errors. Engines wrap the package's errors with the lockspace and resource
// they concern; test them with errors.Is.
package lockc
