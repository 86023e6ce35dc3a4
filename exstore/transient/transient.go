package transient

import (
	"context"
	"errors"
	"fmt"
	"math/bits"
	"sync"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
)

// TypeName is the registry name of the transient store, and TypeAlias the
// kernel's table word for it.
const (
	TypeName  = "transient"
	TypeAlias = "N"
)

// MaxChunkSectors is the largest chunk size the kernel accepts: a chunk's
// byte size must fit in an int (INT_MAX>>9 sectors, rounded down to a power
// of two), which is 1 GiB.
const MaxChunkSectors = 1 << 21

// Store is a transient exception store. It is safe for concurrent use.
//
// Chunks are handed out from 0 upwards; Prepare's sequence is therefore the
// COW chunk itself, and the in-order commit rule ("a Commit returns once every
// earlier Prepare is committed or aborted") is kept by completing exceptions
// strictly in chunk order.
type Store struct {
	cow          blockdev.Device
	chunkSectors uint32
	totalSectors uint64
	chunks       uint64 // whole chunks that fit on the COW device

	mu       sync.Mutex
	table    *exstore.Table
	nextFree exstore.Chunk // next chunk Prepare hands out
	low      exstore.Chunk // lowest chunk not yet committed or aborted
	inFlight map[exstore.Chunk]*inFlight
	invalid  error // *exstore.InvalidError once invalidated
	closed   bool
}

// inFlight is a prepared exception that is not yet committed or aborted.
type inFlight struct {
	old     exstore.Chunk
	aborted bool
	// done is non-nil once Commit queued the exception; it receives the
	// commit's result when every earlier chunk is complete.
	done chan error
}

var _ exstore.Store = (*Store)(nil)

// New returns an empty transient store on cow with chunks of chunkSectors
// sectors. The chunk size must be a power of two between 1 sector and
// MaxChunkSectors, and a multiple of the device's alignment in sectors.
func New(cow blockdev.Device, chunkSectors uint32) (*Store, error) {
	if err := checkChunkSectors(cow, chunkSectors); err != nil {
		return nil, err
	}
	total := uint64(cow.Size()) / exstore.SectorSize
	return &Store{
		cow:          cow,
		chunkSectors: chunkSectors,
		totalSectors: total,
		chunks:       total / uint64(chunkSectors),
		table:        exstore.NewTable(),
		inFlight:     make(map[exstore.Chunk]*inFlight),
	}, nil
}

// checkChunkSectors applies the kernel's chunk-size rules (dm-exception-store
// set_chunk_size) to a chunk size for cow.
func checkChunkSectors(cow blockdev.Device, chunkSectors uint32) error {
	switch {
	case chunkSectors == 0:
		return fmt.Errorf("cow %s: chunk size not set", cow.Name())
	case bits.OnesCount32(chunkSectors) != 1:
		return fmt.Errorf("cow %s: chunk size %d sectors is not a power of 2", cow.Name(), chunkSectors)
	case chunkSectors > MaxChunkSectors:
		return fmt.Errorf("cow %s: chunk size %d sectors is larger than %d", cow.Name(), chunkSectors, MaxChunkSectors)
	}
	if align := cow.Alignment(); align > exstore.SectorSize {
		alignSectors := uint32(align / exstore.SectorSize)
		if chunkSectors%alignSectors != 0 {
			return fmt.Errorf("cow %s: chunk size %d sectors is not a multiple of the device's %d-byte blocks",
				cow.Name(), chunkSectors, align)
		}
	}
	return nil
}

// Register adds the transient store to r under "transient" and the kernel's
// "N". Like the kernel, it requires an explicit chunk size.
func Register(r *exstore.Registry) error {
	return r.Register(exstore.Type{
		Name:    TypeName,
		Aliases: []string{TypeAlias},
		Usage:   "no parameters; the chunk size must be given",
		Open:    open,
	})
}

// open is the registry's OpenFunc for the transient store.
func open(_ context.Context, cow blockdev.Device, args exstore.Args) (exstore.Store, error) {
	if len(args.Params) > 0 {
		return nil, fmt.Errorf("cow %s: transient store takes no parameters, got %q", cow.Name(), args.Params)
	}
	return New(cow, args.ChunkSectors)
}

// ChunkSectors is the chunk size in 512-byte sectors.
func (s *Store) ChunkSectors() uint32 { return s.chunkSectors }

// usable reports why the store cannot take new work, or nil. Callers hold mu.
func (s *Store) usable() error {
	if s.closed {
		return fmt.Errorf("cow %s: %w", s.cow.Name(), exstore.ErrClosed)
	}
	return s.invalid
}

// Lookup returns the COW chunk of old, if it has a committed exception. A
// transient store is never shared, so its answers need no holding: release
// is exstore.NoRelease.
func (s *Store) Lookup(ctx context.Context, old exstore.Chunk) (exstore.Chunk, bool, exstore.Release, error) {
	if err := ctx.Err(); err != nil {
		return 0, false, exstore.NoRelease, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return 0, false, exstore.NoRelease, fmt.Errorf("cow %s: %w", s.cow.Name(), exstore.ErrClosed)
	}
	n, ok := s.table.Lookup(old)
	return n, ok, exstore.NoRelease, nil
}

// LookupRange implements exstore.RangeLookuper: one lock for the run.
func (s *Store) LookupRange(ctx context.Context, first exstore.Chunk, into []exstore.LookupResult) (exstore.Release, error) {
	if err := ctx.Err(); err != nil {
		return exstore.NoRelease, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return exstore.NoRelease, fmt.Errorf("cow %s: %w", s.cow.Name(), exstore.ErrClosed)
	}
	for i := range into {
		n, ok := s.table.Lookup(first + exstore.Chunk(i))
		into[i] = exstore.LookupResult{New: n, Found: ok}
	}
	return exstore.NoRelease, nil
}

// Prepare allocates the next COW chunk for old. It fails with
// exstore.ErrNoSpace once the next chunk would end past the device.
func (s *Store) Prepare(ctx context.Context, old exstore.Chunk) (exstore.Exception, error) {
	if err := ctx.Err(); err != nil {
		return exstore.Exception{}, err
	}
	if old > exstore.MaxChunk {
		return exstore.Exception{}, fmt.Errorf("cow %s: origin chunk %d is beyond the largest chunk %d",
			s.cow.Name(), old, exstore.MaxChunk)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.usable(); err != nil {
		return exstore.Exception{}, err
	}
	// The kernel refuses when next_free + C > size, next_free in sectors.
	if uint64(s.nextFree) >= s.chunks {
		return exstore.Exception{}, fmt.Errorf("cow %s: chunk %d: %w", s.cow.Name(), s.nextFree, exstore.ErrNoSpace)
	}
	e := exstore.Exception{Old: old, New: s.nextFree}
	s.inFlight[e.New] = &inFlight{old: old}
	s.nextFree++
	return e, nil
}

// Commit makes e visible. It does no I/O, as the kernel's transient commit
// does not, but it returns only once every exception prepared before e is
// committed or aborted. If ctx ends first it returns ctx.Err() and e stays
// queued: the Commit or Abort that completes the chunks before it commits it.
func (s *Store) Commit(ctx context.Context, e exstore.Exception) error {
	s.mu.Lock()
	if err := s.usable(); err != nil {
		s.mu.Unlock()
		return err
	}
	p, err := s.inFlightFor(e)
	if err != nil {
		s.mu.Unlock()
		return err
	}
	if p.done != nil || p.aborted {
		s.mu.Unlock()
		return fmt.Errorf("cow %s: exception %v: already committed or aborted: %w", s.cow.Name(), e, exstore.ErrNotPrepared)
	}
	done := make(chan error, 1) // buffered: the completer never waits for an abandoned Commit
	p.done = done
	s.completeInOrder()
	s.mu.Unlock()

	select {
	case err := <-done:
		return err
	default:
	}
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Abort gives up a prepared exception. Its chunk is not handed out again;
// exceptions committed after it stop waiting for it.
func (s *Store) Abort(e exstore.Exception) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	p, err := s.inFlightFor(e)
	if err != nil || p.done != nil || p.aborted {
		return false // not prepared, or already completed: nothing to give up
	}
	p.aborted = true
	s.completeInOrder()
	return true
}

// inFlightFor returns the in-flight record of e, checking that e is what
// Prepare returned. Callers hold mu.
func (s *Store) inFlightFor(e exstore.Exception) (*inFlight, error) {
	p, ok := s.inFlight[e.New]
	if !ok || p.old != e.Old {
		return nil, fmt.Errorf("cow %s: exception %v: already completed, or %w", s.cow.Name(), e, exstore.ErrNotPrepared)
	}
	return p, nil
}

// completeInOrder commits or drops the in-flight exceptions from the lowest
// one upwards, stopping at the first that is neither queued nor aborted.
// Callers hold mu.
func (s *Store) completeInOrder() {
	for s.low < s.nextFree {
		p := s.inFlight[s.low]
		if !p.aborted && p.done == nil {
			return
		}
		if p.done != nil {
			err := s.table.Insert(exstore.Exception{Old: p.old, New: s.low})
			if err != nil {
				err = fmt.Errorf("cow %s: exception %d→%d: %w", s.cow.Name(), p.old, s.low, err)
			}
			p.done <- err
		}
		delete(s.inFlight, s.low)
		s.low++
	}
}

// Usage reports the kernel's transient accounting: every chunk handed out
// (aborted ones included) as allocated, the device size as total, and no
// metadata.
func (s *Store) Usage() exstore.Usage {
	s.mu.Lock()
	defer s.mu.Unlock()
	return exstore.Usage{
		AllocatedSectors: uint64(s.nextFree) * uint64(s.chunkSectors),
		TotalSectors:     s.totalSectors,
		MetadataSectors:  0,
		Exceptions:       s.table.Len(),
	}
}

// Err is nil while the store is valid, and the *exstore.InvalidError once it
// is invalid.
func (s *Store) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.invalid
}

// Invalidate marks the store invalid. A transient store has no header, so
// the mark lives only in memory, as long as the store. Commits waiting for
// earlier exceptions fail at once; later Prepare and Commit calls fail too.
// Invalidating an invalid store keeps the first reason.
func (s *Store) Invalidate(_ context.Context, reason error) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return fmt.Errorf("cow %s: %w", s.cow.Name(), exstore.ErrClosed)
	}
	if s.invalid != nil {
		return nil
	}
	s.invalid = &exstore.InvalidError{Device: s.cow.Name(), Reason: reason}
	s.failQueued(s.invalid)
	return nil
}

// failQueued ends every queued Commit with err; their exceptions are never
// committed but count as aborted, so completeInOrder steps over them.
// Callers hold mu.
func (s *Store) failQueued(err error) {
	for _, p := range s.inFlight {
		if p.done != nil {
			p.done <- err
			p.done = nil
			p.aborted = true
		}
	}
}

// PrepareMerge fails: the kernel's transient store has no merge, and its
// exceptions do not outlive the store anyway.
func (s *Store) PrepareMerge(context.Context) (exstore.Exception, int, error) {
	return exstore.Exception{}, 0, fmt.Errorf("cow %s: transient store merge: %w", s.cow.Name(), errors.ErrUnsupported)
}

// CommitMerge fails: see PrepareMerge.
func (s *Store) CommitMerge(context.Context, int) error {
	return fmt.Errorf("cow %s: transient store merge: %w", s.cow.Name(), errors.ErrUnsupported)
}

// Refresh does nothing: a transient store's metadata is only in this
// process's memory, so no other node can have changed it.
func (s *Store) Refresh(context.Context) error { return nil }

// Walk calls fn for every committed exception until fn returns false. It
// copies the table's runs first, so fn may call the store.
func (s *Store) Walk(fn func(exstore.Exception) bool) {
	type run struct {
		old, new exstore.Chunk
		n        uint64
	}
	s.mu.Lock()
	runs := make([]run, 0, s.table.Entries())
	s.table.Range(func(old, new exstore.Chunk, n uint64) bool {
		runs = append(runs, run{old, new, n})
		return true
	})
	s.mu.Unlock()
	for _, r := range runs {
		for i := range r.n {
			if !fn(exstore.Exception{Old: r.old + exstore.Chunk(i), New: r.new + exstore.Chunk(i)}) {
				return
			}
		}
	}
}

// Close releases the store; its exceptions are gone. Commits still waiting
// fail with exstore.ErrClosed. Close does not close the COW device.
func (s *Store) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	s.failQueued(fmt.Errorf("cow %s: %w", s.cow.Name(), exstore.ErrClosed))
	s.table.Reset()
	return nil
}
