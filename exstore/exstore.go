// Package exstore is the exception-store framework of clustersnap.
//
// An exception store records, for one snapshot, which origin chunks have been
// copied to the snapshot's COW device and where: an exception maps an origin
// chunk (Old) to a COW chunk (New). The design follows the Linux kernel's
// dm-exception-store types: a store loads its metadata, looks chunks up,
// prepares (allocates) exceptions, commits them durably in batches, reports its
// usage as dm-snapshot does, can be invalidated, and offers the two primitives
// that snapshot merge is built from. Refresh re-reads metadata that another
// node changed, which is what the clusterizer builds on.
//
// A store may do more, through optional interfaces the COW engine looks
// for: RangeLookuper (one call for a run of chunks), LazyCommitter
// (exceptions visible at once, durable at the next Sync),
// OptimisticLookuper (answers checked after the I/O instead of held, for
// stores shared with other nodes) and AbsenceChecker (a run of chunks
// without exceptions told at once, for reads that go to the origin). One
// more is for wrappers rather than the COW engine: ConditionalPreparer
// (allocation conditional on a caller's word, and a count of the prepared
// exceptions not yet settled), which the clusterizer admits Prepares with.
//
// The package also holds the in-memory exception Table and the Registry of
// store types. Stores live in their own packages (persistent, transient,
// clusterized) and register themselves into a Registry the program builds.
package exstore

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
)

// SectorSize is the unit of the kernel's chunk sizes and usage figures.
const SectorSize = 512

// Chunk is a chunk index: an origin (or snapshot) chunk, or a COW chunk.
type Chunk uint64

// MaxChunk is the largest chunk number a store accepts. It is the kernel's
// in-memory limit (56 bits), which leaves the top byte of a table entry for a
// run length.
const MaxChunk Chunk = 1<<56 - 1

// Exception maps an origin chunk to the COW chunk that holds its old data.
type Exception struct {
	Old Chunk // chunk of the origin, and of the snapshot view
	New Chunk // chunk of the COW device that holds the data
}

func (e Exception) String() string { return fmt.Sprintf("%d→%d", e.Old, e.New) }

// Usage is a store's space accounting in sectors, as the kernel's status line
// reports it ("<allocated>/<total> <metadata>"), plus the exception count.
type Usage struct {
	AllocatedSectors uint64 // data and metadata handed out so far, header included
	TotalSectors     uint64 // size of the COW device
	MetadataSectors  uint64 // header and metadata areas
	Exceptions       uint64 // exceptions in the table
}

// String formats u as dmsetup status prints a snapshot.
func (u Usage) String() string {
	return fmt.Sprintf("%d/%d %d", u.AllocatedSectors, u.TotalSectors, u.MetadataSectors)
}

// Release ends the span during which a lookup result is held stable.
type Release func()

// NoRelease is the Release of stores whose lookups need no holding.
func NoRelease() {}

// Store is an exception store. All methods are safe for concurrent use.
//
// Prepare hands out COW chunks in increasing order; Commit makes exceptions
// durable in that same order (a Commit waits for every earlier prepared
// exception to be committed or aborted), so a crash never leaves a committed
// exception whose chunk a later allocation could hand out again.
type Store interface {
	// ChunkSectors is the chunk size in 512-byte sectors.
	ChunkSectors() uint32

	// Lookup returns the COW chunk of old, if it has an exception. The answer
	// stays true until release is called: a store shared by several nodes
	// keeps other nodes from adding an exception for old (and so from
	// overwriting the origin chunk) in between, so a caller can read the
	// origin for a miss without racing such a node. release is never nil and
	// must be called exactly once, also on error.
	Lookup(ctx context.Context, old Chunk) (new Chunk, found bool, release Release, err error)

	// Prepare allocates a COW chunk for old. It returns ErrNoSpace when the
	// COW device is full and ErrInvalid (wrapped) once the store is invalid.
	// The exception is not visible to Lookup until it is committed.
	Prepare(ctx context.Context, old Chunk) (Exception, error)

	// Commit makes a prepared exception durable and visible. The caller must
	// have made the chunk's data durable-able (written it) first: the store
	// flushes the COW device before writing metadata that points at it.
	// Concurrent commits are batched into one metadata write. If ctx ends
	// first, Commit returns ctx.Err() but the exception stays queued: it is
	// committed later, or the store is invalidated. If e is not an
	// exception Prepare returned, or was committed or aborted already,
	// Commit does nothing and returns an error wrapping ErrNotPrepared.
	Commit(ctx context.Context, e Exception) error

	// Abort gives up a prepared exception whose data could not be written.
	// Its COW chunk is not reused before the store is reloaded; its origin
	// chunk may be prepared again. It reports whether e was a prepared
	// exception, neither committed nor aborted yet; if not, it did nothing.
	Abort(e Exception) bool

	// Usage reports the store's space accounting.
	Usage() Usage

	// Err is nil while the store is valid, and the reason once it is
	// invalid (wrapping ErrInvalid).
	Err() error

	// Invalidate marks the store invalid, durably for stores with
	// metadata. All later Prepare and Commit calls fail with ErrInvalid.
	Invalidate(ctx context.Context, reason error) error

	// PrepareMerge returns the last exception and how many exceptions before
	// it, n in all, form a run in both Old and New (last.Old-n+1..last.Old
	// maps to last.New-n+1..last.New). n is 0 when nothing is left to merge.
	PrepareMerge(ctx context.Context) (last Exception, n int, err error)

	// CommitMerge durably removes the last n exceptions returned by
	// PrepareMerge. The caller must have copied their data to the origin and
	// made it durable first.
	CommitMerge(ctx context.Context, n int) error

	// Refresh re-reads metadata that another node may have changed: from
	// where it stopped when the metadata only grew, fully otherwise.
	Refresh(ctx context.Context) error

	// Walk calls fn for every committed exception, in no particular order,
	// until fn returns false.
	Walk(fn func(Exception) bool)

	// Close releases the store. It does not close the COW device.
	Close() error
}

// ErrNoSpace is returned by Prepare when the COW device has no free chunk.
var ErrNoSpace = errors.New("exception store is full")

// ErrInvalid is wrapped by every error a store returns once it is invalid.
var ErrInvalid = errors.New("snapshot is invalid")

// ErrClosed is returned by operations on a closed store.
var ErrClosed = errors.New("exception store is closed")

// ErrMerge is wrapped by merge errors that describe the store's state (for
// example a merge asked for more exceptions than PrepareMerge returned).
var ErrMerge = errors.New("merge")

// InvalidError is the error of an invalidated store: it says why.
type InvalidError struct {
	Device string // the COW device
	Reason error  // why it was invalidated; nil if only the header says so
}

func (e *InvalidError) Error() string {
	if e.Reason == nil {
		return fmt.Sprintf("cow %s: %v (header valid flag is 0)", e.Device, ErrInvalid)
	}
	return fmt.Sprintf("cow %s: %v: %v", e.Device, ErrInvalid, e.Reason)
}

// Unwrap makes errors.Is match ErrInvalid and the reason.
func (e *InvalidError) Unwrap() []error {
	if e.Reason == nil {
		return []error{ErrInvalid}
	}
	return []error{ErrInvalid, e.Reason}
}

// ErrExists is returned by Prepare when old already has a committed
// exception. A store shared by several nodes returns it when another node
// added the exception after this node's lookup missed; the caller looks the
// chunk up again and uses that exception.
var ErrExists = errors.New("chunk already has an exception")

// ErrNotPrepared is returned by Commit and CommitLazy for an exception that
// Prepare did not return, or that was committed or aborted already: a
// caller's bug, which the store refuses without changing anything. A store
// that wraps another relies on it to learn whether the commit took.
var ErrNotPrepared = errors.New("not a prepared exception")

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
