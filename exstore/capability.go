package exstore

import (
	"context"
	"errors"
	"sync/atomic"
)

// LookupResult is one chunk's answer in a range lookup.
type LookupResult struct {
	New   Chunk // the COW chunk, if Found
	Found bool  // whether the chunk has an exception
}

// RangeLookuper is implemented by stores that look up a run of chunks in
// one call, which costs a reader one lock (or one cluster lock check)
// instead of one per chunk.
type RangeLookuper interface {
	// LookupRange is Lookup of chunks first, first+1, ...,
	// first+len(into)-1, answered into into, all held stable until the
	// one release is called (exactly once, also on error).
	LookupRange(ctx context.Context, first Chunk, into []LookupResult) (Release, error)
}

// AbsenceChecker is implemented by stores that can tell cheaply, without
// a lock, that a run of chunks has no exceptions: a snapshot read of such
// a run, the common case, goes to the origin without per-chunk answers.
// Only stores whose answers need no holding (Lookup's release does
// nothing) implement it.
type AbsenceChecker interface {
	// NoExceptions reports whether none of chunks first, first+1, ...,
	// first+n-1 has an exception, as Lookup would have answered at some
	// instant during the call. False says nothing: the caller looks the
	// chunks up.
	NoExceptions(first Chunk, n uint64) bool
}

// OptimisticLookuper is implemented by stores whose Lookup holds a miss
// stable at a cost (a store shared with other nodes holds its cluster lock
// for it) and that can instead tell afterwards whether an answer may have
// changed. A reader looks up without holding anything, does the I/O the
// answers guide, then asks Unchanged; if they may have changed (another
// node may have added an exception for a chunk that missed, and then
// overwritten its origin chunk), it reads again. Hits are stable anyway:
// exceptions are removed only by an offline merge.
type OptimisticLookuper interface {
	// LookupOptimistic is Lookup of old, holding nothing, with a token for
	// Unchanged; ok is false, and nothing else is meaningful, when it
	// cannot answer without waiting or failed: the caller then uses
	// Lookup.
	LookupOptimistic(old Chunk) (new Chunk, found bool, token uint64, ok bool)
	// LookupRangeOptimistic is LookupOptimistic of chunks first,
	// first+1, ..., first+len(into)-1, answered into into.
	LookupRangeOptimistic(first Chunk, into []LookupResult) (token uint64, ok bool)
	// Unchanged reports whether every answer given with token still
	// holds: no chunk that missed can have gained an exception since. A
	// reader calls it after its I/O is done.
	Unchanged(token uint64) bool
}

// ConditionalPreparer is implemented by stores that can make an allocation
// conditional on a word the caller owns and count the exceptions not yet
// settled, under one lock. A wrapper that must know when no prepared
// exception is outstanding (the clusterizer, before it gives its cluster
// lock up) uses them instead of counting Prepares itself: it changes the
// word, then reads Unsettled, and knows that every Prepare admitted before
// the change is in the count and none is admitted after it.
type ConditionalPreparer interface {
	// PrepareIfUnchanged is Prepare, except that it allocates only if
	// *word equals want at the moment it does, checked under the lock that
	// Unsettled takes; otherwise it changes nothing and returns an error
	// wrapping ErrChanged (before any other refusal, a closed store's
	// included).
	PrepareIfUnchanged(ctx context.Context, old Chunk, word *atomic.Uint64, want uint64) (Exception, error)
	// Unsettled is how many exceptions are prepared and not settled yet:
	// neither aborted, nor committed lazily, nor written (or failed) by a
	// Commit.
	Unsettled() int
}

// ErrChanged is returned by PrepareIfUnchanged when the caller's word no
// longer has the value it was to allocate under.
var ErrChanged = errors.New("admission word changed")

// LazyCommitter is implemented by stores that can make an exception visible
// at once and durable later, as a disk's write cache makes a write durable
// at the next flush: a snapshot write owes durability only to the next
// FLUSH (or to its own FUA), so its exception need not cost a metadata
// write of its own. An origin write must never overwrite a chunk whose
// exception is not durable: it calls Sync first when Durable says so.
type LazyCommitter interface {
	// CommitLazy makes prepared e visible to Lookup at once; it becomes
	// durable by the next Sync at the latest. A crash before that loses it,
	// and with it only snapshot writes that no flush covered. Like Commit,
	// it returns an error wrapping ErrNotPrepared for an exception that
	// is not (or no longer) prepared. A durable Commit or a Sync waiting
	// behind e is not left waiting: once e is committed lazily they
	// finish as if it had been committed normally.
	CommitLazy(ctx context.Context, e Exception) error
	// Durable reports whether the exception whose COW chunk is new (one
	// that Lookup returned) is durable: false only while it was committed
	// lazily and no Sync or batch has written it yet.
	Durable(new Chunk) bool
	// Sync makes every exception committed before the call durable, and
	// everything written to the COW device before the call: it flushes the
	// device (once, when it has exceptions to write).
	Sync(ctx context.Context) error
}

// Labeler is implemented by stores whose COW device can carry a Label: who
// the COW is (a UUID) and what it belongs to (a cluster and an origin), so
// that a node never serves it against the wrong origin or for the wrong
// cluster. A store without one (the transient store, whose exceptions live
// in one process) has nothing to label.
type Labeler interface {
	// Label reads the COW's label from the device: ok is false when the
	// COW carries none. A label that is there but cannot be trusted (a
	// bad checksum, an unknown version, foreign bytes) is an error saying
	// why, never "no label".
	Label(ctx context.Context) (l Label, ok bool, err error)
	// SetLabel writes l durably, replacing any label, and nothing else
	// of the store's metadata. The caller excludes other writers of the
	// label (in a cluster, other nodes).
	SetLabel(ctx context.Context, l Label) error
}
