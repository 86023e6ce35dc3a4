package exstore

import (
	"context"
	"errors"
	"fmt"
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
