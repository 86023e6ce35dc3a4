// Package dlm is a lockc engine on the Linux kernel's DLM, through its
// misc devices (dlm-control and one dlm_<lockspace> per lockspace) in pure
// Go: no cgo, no libdlm. The device ABI is specs/locks.md §2 and §7; the
// semantics are the DLM's, which lockc's are modelled on.
//
// Requirements. A kernel with the dlm module and configfs, and a cluster
// controller that configured the local node and answers lockspace joins:
// dlm_controld with corosync in production, package lockc/dlm/solo in
// single-kernel tests. Creating and leaving lockspaces needs CAP_SYS_ADMIN.
// Open fails with ErrNoDLM without the module and with ErrNoController
// without a controller; a device ABI whose major is not 6 is refused.
//
// Owners. Each Open creates (or joins) the kernel lockspace and opens its
// own device file: the kernel treats each file as one lock owner, so
// several Engines, or several Opens, in one process hold locks
// independently, as processes on different nodes would (this is how one
// kernel simulates a cluster: package lockc/dlm/dlmtest). Close leaves the
// lockspace; the kernel frees it when its last creator leaves. A join that
// races the final free of a lockspace of the same name can attach to the
// dying one (a kernel race); keep one member open while others churn.
//
// Locks. Every lockc promise is the kernel's own grant logic: six modes,
// grant order, conversions, QueueConvert (QUECVT, up-conversions only;
// refused with ErrBadRequest otherwise), NoQueue (NOQUEUE, ErrWouldBlock),
// Expedite (new NL requests only), NoOrder, conversion deadlock (EDEADLK:
// ErrDeadlock, the old mode kept). ErrBusy is detected before anything is
// written. Every request carries the 32-byte LVB with VALBLK: the value to
// publish on writes (the staged one, or the copy read), zeros on reads, so
// that a resource without a value reads as zeros. The LVB's state is
// Invalid when the kernel sets VALNOTVALID, Unknown when it is all zeros,
// Valid otherwise. The kernel reports VALNOTVALID only on a resource that
// holds an LVB: an invalidated resource that never held a value reads as
// Unknown. Blocking notifications come from the kernel's basts,
// coalesced on a channel of one: only a higher mode than any since the
// last grant replaces an unread one; unlocking withdraws an unread one.
// Unlock returns once the kernel confirms it (so that, on a remote master
// too, the resource is free when it returns), or ctx ends, or the
// lockspace is lost.
// Device ABI 6.0.1 converts NL→EX through PR, as lvmlockd does, because
// its NL→EX may not return the latest LVB.
//
// Cancellation. When ctx ends while a request or conversion waits, the
// engine sends CANCEL. If the grant won the race it undoes it (unlocks the
// new lock, converts back to the old mode) and returns ctx.Err() with
// nothing more held and nothing new published: an undo from PW or EX marks
// the LVB invalid (IVVALBLK) instead of writing back what the grant read,
// because across guests a write-back was seen to make an invalidated LVB
// valid again. On a remote master the release may still be settling when
// the call returns: another node's NoQueue request can be refused for a
// moment. A write the kernel
// itself blocks (a stopped lockspace) is not abandoned for ctx; it ends
// with the loss the liveness probe declares.
//
// Reader and ordering. One goroutine per device file reads results
// through the netpoller (the file is non-blocking) and hands them to their
// locks by a per-lock key the kernel echoes in castparam and bastparam;
// the ast address, one of two sentinels, tells a completion from a bast.
// Results of one file arrive in the order the kernel queued them, so a
// request's answer follows every notification queued before it (Sync uses
// this). Writes go through the file's RawConn: the kernel answers a write
// with a number (a lock id, a minor), not a byte count.
//
// Loss. The kernel gives no eviction signal on the file. The lockspace is
// lost when reading the file fails, on Close, on Crash (tests), or when
// the liveness probe stalls: every StallBound/3 the engine converts a probe
// lock (NL, on a resource of its own) NL→NL, and if the answer takes longer
// than StallBound (default DefaultStallBound) the lockspace is lost. While
// the controller has a lockspace stopped (recovering from a member's
// failure, or because this node lost quorum) the kernel blocks every
// request in it, so a stalled probe means this node can no longer be sure
// its locks are its own. On loss, in order: the OnLost functions run, IsLost
// turns true, Lost is closed, pending operations fail with ErrLost and
// later ones on its locks with ErrUnlocked. Then, in the background, Close
// unlocks its granted locks (publishing what they staged), and the device
// file is closed, whereupon the kernel force-unlocks what remains (and
// marks the LVB invalid where a PW or EX lock was), and the lockspace is
// left. Close and Crash wait a bounded time for that; a stopped lockspace
// can hold the kernel's release up until it runs again.
//
// What is guaranteed, and what needs fencing. Locks are the kernel's: no
// two nodes are granted incompatible modes while every node's lockspace
// runs. A node that crashes loses its locks when its file closes (its
// process exits) or when the other members recover without it. The loss
// ordering above holds for everything this process itself does: OnLost
// runs before the kernel can grant another node what this node held,
// because the file is closed only after. For a node that is partitioned
// or stalled, though, the stall bound is only a local observation: the
// majority recovers, and may grant this node's locks elsewhere, whenever
// its controller decides. Only dlm_controld with fencing makes "stop before
// another node is granted" hold: fencing kills (or cuts off from storage)
// the stalled node before recovery completes. Without fencing, a
// partitioned node's I/O may overlap the new holder's for up to
// StallBound plus StallBound/3 and however long the kernel keeps its
// writes queued. Production clusters run dlm_controld with fencing.
//
// Not offered: fencing tokens (lockc.Tokener; the kernel keeps its grant
// counters to itself), persistent (orphan) locks, and a count of
// remembered resources.
package dlm
