package lockc

import (
	"context"
	"errors"
)

// Flag modifies a lock request or conversion. Flags combine with |.
type Flag uint32

const (
	// NoQueue fails the request with ErrWouldBlock instead of waiting, and
	// sends no blocking notifications.
	NoQueue Flag = 1 << iota
	// QueueConvert queues an up-conversion behind the conversions already
	// waiting instead of granting it in place (the DLM's QUECVT).
	QueueConvert
	// Expedite grants a new NL request at once regardless of queues.
	Expedite
	// NoOrder ignores queue order: grant as soon as compatible.
	NoOrder
)

// JoinFlags combines flags into one (the variadic flags of Lock and
// Convert).
func JoinFlags(flags ...Flag) Flag {
	var f Flag
	for _, x := range flags {
		f |= x
	}
	return f
}

// MaxResourceName is the longest resource name an engine must accept (the
// DLM's limit).
const MaxResourceName = 64

// Engine opens lockspaces for one node.
type Engine interface {
	// Open joins the named lockspace. Lockspaces of different names are
	// independent.
	Open(ctx context.Context, lockspace string) (Lockspace, error)
}

// Lockspace is one node's membership of a lockspace.
type Lockspace interface {
	// NodeID identifies this node within the lockspace's cluster.
	NodeID() uint32
	// Name is the lockspace's name.
	Name() string
	// Lock requests a new lock on resource (at most MaxResourceName
	// bytes) in mode m and waits until it is granted, ctx ends
	// (ctx.Err(), nothing held), NoQueue finds it blocked (ErrWouldBlock)
	// or the lockspace is lost (ErrLost).
	Lock(ctx context.Context, resource []byte, m Mode, flags ...Flag) (Lock, error)
	// Lost is closed when this node loses the lockspace (evicted, lease
	// expired, crashed, closed): every lock is gone and I/O that the
	// locks protected must stop.
	Lost() <-chan struct{}
	// Err is nil until Lost is closed, then says why (wrapping ErrLost).
	Err() error
	// Close releases every lock of this node in the lockspace and leaves
	// it; Lost is closed.
	Close() error
}

// LostChecker is implemented by lockspaces that can say whether Lost is
// closed without a channel operation: a user that asks on every I/O (the
// clusterizer does, several times per write) then pays an atomic load, not
// a receive on a channel.
type LostChecker interface {
	// IsLost reports whether Lost is closed. It is true before Lost is
	// closed, so that anyone who saw Lost closed sees it true.
	IsLost() bool
}

// LostNotifier is implemented by lockspaces that can call a function
// synchronously with the loss, before anyone can observe it: a user that
// checks for the loss on every I/O then reads a flag of its own that the
// function sets, which costs less than a call through LostChecker.
type LostNotifier interface {
	// OnLost has f called once when this node loses the lockspace:
	// before IsLost turns true, before Lost is closed, and before another
	// node can be granted a lock this node held. If the lockspace is lost
	// already, f is called before OnLost returns. f must return quickly
	// and must not call into the lockspace (it may run under its locks).
	OnLost(f func())
}

// Lock is one granted lock. A lock allows one operation (Convert or Unlock)
// at a time; a second one while the first waits fails with ErrBusy.
type Lock interface {
	// Mode is the granted mode.
	Mode() Mode
	// LVB is the value block as read at the last grant or up-conversion
	// (or as staged by SetLVB since), and its state.
	LVB() (LVB, LVBState)
	// SetLVB stages v to be written to the resource when this lock next
	// leaves PW or EX (down-conversion, same-mode conversion or unlock).
	// It has no effect on the resource while the lock is below PW.
	SetLVB(v LVB)
	// InvalidateLVB stages an invalidation instead: the next write from
	// PW or EX marks the resource's LVB invalid (the DLM's IVVALBLK).
	InvalidateLVB()
	// Convert changes the lock's mode. A down-conversion is granted at
	// once; an up-conversion waits like a request (before new requests),
	// fails with ErrWouldBlock under NoQueue, with ErrDeadlock when
	// another conversion waits for this lock while this one waits for it,
	// and on ctx's end returns ctx.Err() with the lock at its old mode.
	Convert(ctx context.Context, m Mode, flags ...Flag) error
	// Unlock releases the lock (publishing the LVB from PW or EX).
	Unlock(ctx context.Context) error
	// Blocking delivers blocking notifications: the mode of a request
	// that this lock's mode keeps waiting. Notifications are coalesced to
	// the highest requested mode and never block the engine; the channel
	// is never closed.
	Blocking() <-chan Mode
}

// Tokener is implemented by locks whose engine numbers grants across the
// whole cluster. It is optional because a lock manager may keep that number
// to itself: the kernel DLM counts grants per resource but never hands the
// count to userspace. Nothing in clustersnap's safety rests on tokens; they
// let storage that can check them refuse a stale holder's writes.
type Tokener interface {
	// Token is a fencing token: it increases with every grant and
	// up-conversion on the resource, across all nodes.
	Token() uint64
}

// Errors returned by engines. Engines wrap them with the resource and
// lockspace they concern.
var (
	// ErrWouldBlock: a NoQueue request or conversion could not be granted
	// at once.
	ErrWouldBlock = errors.New("lock would block")
	// ErrDeadlock: two conversions wait for each other; the newer one
	// fails and keeps its old mode.
	ErrDeadlock = errors.New("conversion deadlock")
	// ErrBusy: another operation on the same lock is still pending.
	ErrBusy = errors.New("lock operation already in progress")
	// ErrLost: the node lost the lockspace; its locks are gone.
	ErrLost = errors.New("lockspace lost")
	// ErrUnlocked: the lock was already unlocked (or lost).
	ErrUnlocked = errors.New("lock is not held")
	// ErrBadRequest: an invalid mode, flag combination or resource name.
	ErrBadRequest = errors.New("invalid lock request")
)
