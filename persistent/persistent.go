// Package persistent is clustersnap's dm-snapshot compatible exception store:
// a COW device it writes activates in the kernel as "snapshot <origin> <cow>
// P 0", and a COW the kernel wrote opens here. The layout, the allocation
// rule, the commit ordering and the merge primitives are those of the
// kernel's drivers/md/dm-snap-persistent.c (see shared/specs/dm-snapshot-format.md).
//
// Crash safety: a record is written only after the data it points to is
// durable (the COW device is synced first, the kernel's PREFLUSH), and Commit
// returns only once the record itself is durable (FUA). The area after a
// full area is zeroed before the full area is written, so a loader always
// finds a terminator. Exceptions are committed in allocation order, so a
// crash never leaks a chunk that a later allocation could reuse.
// CommitLazy (exstore.LazyCommitter) makes an exception visible at once and
// leaves its record for the next batch, which Sync, a Commit or enough
// waiting exceptions start, with the same ordering; the COW engine uses it
// for snapshot writes, which owe durability only to the next flush.
//
// Unlike the kernel, the store writes only the sectors of an area that
// changed (byte-for-byte the same result), refuses an allocation that would
// leave a full last area with no room for its successor, writes the invalid
// flag durably, and refuses metadata that points outside the COW.
package persistent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"sync"
	"sync/atomic"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
)

// TypeName is the registry name of this store type; the kernel calls it "P".
const TypeName = "persistent"

// ErrNotFormatted is returned by Open with NoFormat for a device whose
// header is zero.
var ErrNotFormatted = errors.New("not a snapshot COW: the header is zero (format it with snapd create)")

// readChunk bounds the size of one metadata read while scanning large areas.
const readChunk = 1 << 20

// Options tune Open.
type Options struct {
	// ChunkSectors is the chunk size for a new store; 0 means the kernel's
	// default (32 sectors). An existing header's chunk size always wins.
	ChunkSectors uint32
	// NoFormat refuses a device whose header is zero (ErrNotFormatted)
	// instead of formatting it, for tools that only inspect.
	NoFormat bool
	// Logger receives warnings (chunk size overridden by the header, garbage
	// after the terminator). nil means slog.Default().
	Logger *slog.Logger
}

// Register adds the "persistent" type (alias "P") to r.
func Register(r *exstore.Registry) error {
	return r.Register(exstore.Type{
		Name:    TypeName,
		Aliases: []string{"P"},
		Usage:   "no parameters",
		Open: func(ctx context.Context, cow blockdev.Device, args exstore.Args) (exstore.Store, error) {
			if len(args.Params) != 0 {
				return nil, fmt.Errorf("cow %s: persistent store takes no parameters, got %q", cow.Name(), args.Params)
			}
			return Open(ctx, cow, Options{ChunkSectors: args.ChunkSectors, NoFormat: args.NoFormat})
		},
	})
}

// prepared is an exception handed out by Prepare and not yet written.
type prepared struct {
	e       exstore.Exception
	ready   bool       // Commit or CommitLazy was called
	lazy    bool       // CommitLazy was called: in the table already, nobody waits
	aborted bool       // Abort was called
	done    chan error // set by Commit; receives the outcome
}

// noLazy is lazyFirst when no lazily committed exception waits.
const noLazy = math.MaxUint64

// Store is a persistent exception store on one COW device.
//
// Locks, in the order they are taken: metaMu serialises metadata I/O (the
// committer's batches, Refresh, merge, invalidation); allocMu guards
// allocation, the queue of prepared exceptions and the area position; mu
// guards the table, so lookups never wait for I/O; validity is an atomic.
type Store struct {
	dev   blockdev.Device
	name  string
	log   *slog.Logger
	geo   Geometry
	align int // metadata I/O granularity: max(512, device alignment)
	// table is published atomically (a full scan replaces it) so that
	// Lookup and LookupRange can ask its filter without mu
	// (Table.RulesOut); its contents are guarded by mu.
	table   atomic.Pointer[exstore.Table]
	invalid atomic.Pointer[exstore.InvalidError] // set once invalid; read without locks on every I/O

	metaMu sync.Mutex
	// Owned by whoever holds metaMu:
	tail       []byte            // the aligned block of the current area holding slot committed (records before it, zeros after)
	dirtyTo    int64             // area bytes up to which the disk may hold stale non-zero records past the terminator
	lastRec    exstore.Exception // the last committed record, to tell growth from change on Refresh
	hasLastRec bool
	writeBuf   []byte
	merge      struct {
		last exstore.Exception
		n    int
	}

	allocMu     sync.Mutex
	nextFree    uint64
	currentArea uint64
	committed   uint64 // records in the current area
	reserved    uint64 // prepared exceptions not aborted and not yet written
	unsettled   int    // prepared exceptions not aborted, not committed lazily, not yet written by a Commit (Unsettled)
	queue       []*prepared
	byNew       map[exstore.Chunk]*prepared
	pendingOld  map[exstore.Chunk]struct{}
	closed      bool
	// Lazily committed exceptions (CommitLazy) that no batch has written
	// yet: how many, the highest COW chunk of any committed so far, and
	// the lowest of those waiting (noLazy if none; lazyFirstNow mirrors it
	// for Durable, which takes no lock). Every visible exception whose COW
	// chunk is at least lazyFirst waits: one committed normally after it
	// is written only in a batch that writes it too.
	lazyWaiting int
	// durableWaiting counts the queued exceptions whose Commit waits,
	// syncWaiting the Syncs waiting: a lazy commit that completes the
	// queue's ready prefix must wake the committer for them.
	durableWaiting, syncWaiting int
	lazyLast                    exstore.Chunk
	lazyFirst                   uint64
	lazyFirstNow                atomic.Uint64
	// Batches started and completed, and a channel closed (and replaced)
	// at the end of each, for Sync to wait on.
	batchesStarted, batchesDone uint64
	batchEnd                    chan struct{}

	// mu guards the table's contents. Its read lock writes its line,
	// which is why the table pointer and validity, loaded on every I/O,
	// live among the read-only fields above instead of next to it.
	mu sync.RWMutex

	wake     chan struct{}
	stop     chan struct{}
	stopped  chan struct{}
	stopOnce sync.Once
}

var (
	_ exstore.Store               = (*Store)(nil)
	_ exstore.RangeLookuper       = (*Store)(nil)
	_ exstore.LazyCommitter       = (*Store)(nil)
	_ exstore.AbsenceChecker      = (*Store)(nil)
	_ exstore.ConditionalPreparer = (*Store)(nil)
)

// Open opens the persistent store on cow, formatting it when its first four
// bytes are zero, as the kernel does with a new COW device.
func Open(ctx context.Context, cow blockdev.Device, opts Options) (*Store, error) {
	s, err := newStore(cow, opts)
	if err != nil {
		return nil, err
	}
	hb, err := s.readAt(0, s.align)
	if err != nil {
		return nil, s.errf("read header: %w", err)
	}
	h := DecodeHeader(hb)
	if h.Magic == 0 {
		if opts.NoFormat {
			return nil, s.errf("%w", ErrNotFormatted)
		}
		cs := opts.ChunkSectors
		if cs == 0 {
			cs = DefaultChunkSectors
		}
		if err := s.format(cs); err != nil {
			return nil, err
		}
	} else {
		if err := h.Check(); err != nil {
			return nil, s.errf("%w", err)
		}
		if opts.ChunkSectors != 0 && opts.ChunkSectors != h.ChunkSectors {
			s.log.Warn("chunk size from the COW header overrides the requested one",
				"cow", s.name, "header_sectors", h.ChunkSectors, "requested_sectors", opts.ChunkSectors)
		}
		if err := s.setGeometry(h.ChunkSectors); err != nil {
			return nil, err
		}
		if h.Valid == 0 {
			// The kernel does not read the exceptions of an invalid snapshot.
			s.invalid.Store(&exstore.InvalidError{Device: s.name})
		} else if err := s.scan(ctx, 0, 0, true); err != nil {
			return nil, err
		}
	}
	s.start()
	return s, nil
}

// Format writes a new, empty store on cow with the given chunk size, whatever
// the device held, and opens it.
func Format(ctx context.Context, cow blockdev.Device, chunkSectors uint32, logger *slog.Logger) (*Store, error) {
	s, err := newStore(cow, Options{ChunkSectors: chunkSectors, Logger: logger})
	if err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := s.format(chunkSectors); err != nil {
		return nil, err
	}
	s.start()
	return s, nil
}

func newStore(cow blockdev.Device, opts Options) (*Store, error) {
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	s := &Store{
		dev:        cow,
		name:       cow.Name(),
		log:        log,
		align:      max(exstore.SectorSize, cow.Alignment()),
		byNew:      make(map[exstore.Chunk]*prepared),
		pendingOld: make(map[exstore.Chunk]struct{}),
		lazyFirst:  noLazy,
		batchEnd:   make(chan struct{}),
		wake:       make(chan struct{}, 1),
		stop:       make(chan struct{}),
		stopped:    make(chan struct{}),
	}
	if cow.Size() < int64(s.align) {
		return nil, s.errf("device of %d bytes is too small for a header", cow.Size())
	}
	s.lazyFirstNow.Store(noLazy)
	s.table.Store(exstore.NewTable())
	return s, nil
}

func (s *Store) errf(format string, args ...any) error {
	return fmt.Errorf("cow %s: "+format, append([]any{s.name}, args...)...)
}

func (s *Store) setGeometry(chunkSectors uint32) error {
	if err := CheckChunkSectors(chunkSectors); err != nil {
		return s.errf("%w", err)
	}
	g := NewGeometry(chunkSectors, s.dev.Size())
	if g.ChunkBytes%int64(s.align) != 0 {
		return s.errf("chunk size %d bytes is not a multiple of the device's I/O alignment %d", g.ChunkBytes, s.align)
	}
	if g.Chunks < 2 {
		return s.errf("device of %d bytes holds fewer than two %d-byte chunks (header and first metadata area)", s.dev.Size(), g.ChunkBytes)
	}
	s.geo = g
	s.tail = blockdev.AlignedBuffer(s.align, s.align)
	s.nextFree = 2
	return nil
}

// format writes a fresh store: area 0 zeroed and durable first, then the
// header durably, so a crash in between leaves a device that still reads as
// new (magic 0) or as an empty valid store.
func (s *Store) format(chunkSectors uint32) error {
	if err := s.setGeometry(chunkSectors); err != nil {
		return err
	}
	if err := s.zeroChunk(s.geo.AreaLocation(0)); err != nil {
		return s.errf("zero metadata area 0: %w", err)
	}
	// The kernel writes the whole header chunk; everything past the fields is zero.
	if err := s.zeroChunk(0); err != nil {
		return s.errf("zero header chunk: %w", err)
	}
	if err := s.dev.Sync(); err != nil {
		return s.errf("sync after zeroing: %w", err)
	}
	if err := s.writeHeader(1); err != nil {
		return err
	}
	return nil
}

func (s *Store) writeHeader(valid uint32) error {
	b := blockdev.AlignedBuffer(s.align, s.align)
	Header{Magic: Magic, Valid: valid, Version: Version, ChunkSectors: s.geo.ChunkSectors}.Encode(b)
	if _, err := s.dev.WriteAtSync(b, 0); err != nil {
		return s.errf("write header (valid=%d): %w", valid, err)
	}
	return nil
}

func (s *Store) zeroChunk(c exstore.Chunk) error {
	n := min(s.geo.ChunkBytes, readChunk)
	z := blockdev.AlignedBuffer(int(n), s.align)
	base := int64(c) * s.geo.ChunkBytes
	for off := int64(0); off < s.geo.ChunkBytes; off += n {
		if _, err := s.dev.WriteAt(z, base+off); err != nil {
			return err
		}
	}
	return nil
}

func (s *Store) readAt(off int64, n int) ([]byte, error) {
	b := blockdev.AlignedBuffer(n, s.align)
	if _, err := s.dev.ReadAt(b, off); err != nil {
		return nil, err
	}
	return b, nil
}

func (s *Store) areaOffset(area uint64) int64 {
	return int64(s.geo.AreaLocation(area)) * s.geo.ChunkBytes
}

// scan reads metadata from (area, slot) onwards until the terminator. An
// incremental scan (Refresh after growth) adds the records to the live
// table; a full scan (load, reload) builds a new table and publishes it with
// the new area position and next_free at once, so concurrent lookups never
// see a half-loaded table and Prepare never allocates from a reset next_free.
// The caller holds metaMu, or is Open.
func (s *Store) scan(ctx context.Context, area, slot uint64, full bool) error {
	g := s.geo
	maxNew := uint64(0)
	var recs []exstore.Exception
	table := s.table.Load()
	if full {
		table = exstore.NewTable()
	}
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		loc := g.AreaLocation(area)
		if uint64(loc) >= g.Chunks {
			// Only reached after a full area: the kernel fails such a load.
			return s.errf("%w: metadata area %d is full but its successor (chunk %d) lies past the end of the device (%d chunks)",
				ErrCorrupt, area-1, loc, g.Chunks)
		}
		found, end, err := s.scanArea(area, slot, &recs, &maxNew)
		if err != nil {
			return err
		}
		if err := s.insert(table, recs, !full); err != nil {
			return err
		}
		recs = recs[:0]
		if !found {
			area, slot = area+1, 0
			continue
		}
		next := g.skipMetadata(max(2, maxNew+1))
		if full {
			s.mu.Lock()
			s.table.Store(table)
			s.mu.Unlock()
		}
		s.allocMu.Lock()
		s.currentArea, s.committed = area, end
		if full || next > s.nextFree {
			s.nextFree = next
		}
		s.allocMu.Unlock()
		return nil
	}
}

// scanArea reads records of one area from slot on. found says whether a
// terminator was met (at slot end); records before it are appended to recs.
// Non-zero records after the terminator are logged and remembered in dirtyTo
// so that the next write of this area clears them.
func (s *Store) scanArea(area, slot uint64, recs *[]exstore.Exception, maxNew *uint64) (found bool, end uint64, err error) {
	g := s.geo
	base := s.areaOffset(area)
	blk := uint64(s.align / RecordSize)
	perRead := uint64(min(g.ChunkBytes, readChunk) / RecordSize)
	first := slot - slot%blk
	term := uint64(0)
	for from := first; from < g.PerArea; from += perRead {
		n := min(perRead, g.PerArea-from)
		b, err := s.readAt(base+int64(from*RecordSize), int(n*RecordSize))
		if err != nil {
			return false, 0, s.errf("read metadata area %d (chunk %d): %w", area, g.AreaLocation(area), err)
		}
		start := uint64(0)
		if from < slot {
			start = slot - from
		}
		for i := start; i < n; i++ {
			r := DecodeRecord(b, int(i))
			if !found {
				if r.New == 0 {
					found, term = true, from+i
					// The block holding the terminator is the tail the
					// next commit continues.
					bs := (i - i%blk) * RecordSize
					copy(s.tail, b[bs:bs+uint64(s.align)])
					clear(s.tail[(i%blk)*RecordSize:])
					continue
				}
				if err := s.checkRecord(area, from+i, r); err != nil {
					return false, 0, err
				}
				*recs = append(*recs, r)
				*maxNew = max(*maxNew, uint64(r.New))
				s.lastRec, s.hasLastRec = r, true
				continue
			}
			if r.Old != 0 || r.New != 0 {
				s.log.Warn("non-zero record after the terminator; it will be cleared by the next metadata write",
					"cow", s.name, "area", area, "slot", from+i, "terminator_slot", term, "record", r.String())
				s.dirtyTo = max(s.dirtyTo, int64(from+i+1)*RecordSize)
			}
		}
	}
	if found {
		return true, term, nil
	}
	return false, g.PerArea, nil
}

// checkRecord refuses records that point outside the device or at metadata:
// the kernel would follow them and read or overwrite the wrong chunk.
func (s *Store) checkRecord(area, slot uint64, r exstore.Exception) error {
	g := s.geo
	switch {
	case uint64(r.New) >= g.Chunks:
		return s.errf("%w: area %d slot %d: exception %v points past the end of the device (%d chunks)", ErrCorrupt, area, slot, r, g.Chunks)
	case g.IsMetadata(r.New):
		return s.errf("%w: area %d slot %d: exception %v points at a metadata chunk", ErrCorrupt, area, slot, r)
	case r.Old > exstore.MaxChunk:
		return s.errf("%w: area %d slot %d: origin chunk of exception %v is beyond the 2^56 limit", ErrCorrupt, area, slot, r)
	}
	return nil
}

func (s *Store) insert(table *exstore.Table, recs []exstore.Exception, live bool) error {
	if len(recs) == 0 {
		return nil
	}
	if live {
		s.mu.Lock()
		defer s.mu.Unlock()
	}
	for _, r := range recs {
		if err := table.Insert(r); err != nil {
			return s.errf("%w: exception %v: %w", ErrCorrupt, r, err)
		}
	}
	return nil
}

// loadTail reads the aligned block of the current area that holds slot
// committed and clears everything from that slot on in memory.
func (s *Store) loadTail() error {
	blkSlots := uint64(s.align / RecordSize)
	first := s.committed - s.committed%blkSlots
	if s.committed == s.geo.PerArea { // a full area is never current
		return s.errf("internal: current area %d is full", s.currentArea)
	}
	b, err := s.readAt(s.areaOffset(s.currentArea)+int64(first*RecordSize), s.align)
	if err != nil {
		return s.errf("read metadata area %d: %w", s.currentArea, err)
	}
	clear(b[(s.committed-first)*RecordSize:])
	copy(s.tail, b)
	return nil
}

// ChunkSectors implements exstore.Store.
func (s *Store) ChunkSectors() uint32 { return s.geo.ChunkSectors }

// Geometry returns the device layout.
func (s *Store) Geometry() Geometry { return s.geo }

// Lookup implements exstore.Store. A local store's answers stay true until
// this process changes them, so release is a no-op. Lookup answers from the
// table even when the store is invalid; callers check Err.
func (s *Store) Lookup(ctx context.Context, old exstore.Chunk) (exstore.Chunk, bool, exstore.Release, error) {
	if s.NoExceptions(old, 1) {
		return 0, false, exstore.NoRelease, nil
	}
	s.mu.RLock()
	n, ok := s.table.Load().Lookup(old)
	s.mu.RUnlock()
	return n, ok, exstore.NoRelease, nil
}

// LookupRange implements exstore.RangeLookuper: one read lock for the run,
// or none when the table's filter rules the whole run out.
func (s *Store) LookupRange(ctx context.Context, first exstore.Chunk, into []exstore.LookupResult) (exstore.Release, error) {
	if s.NoExceptions(first, uint64(len(into))) {
		clear(into)
		return exstore.NoRelease, nil
	}
	s.mu.RLock()
	s.table.Load().LookupRange(first, into)
	s.mu.RUnlock()
	return exstore.NoRelease, nil
}

// NoExceptions implements exstore.AbsenceChecker: the table's filter, read
// without mu.
func (s *Store) NoExceptions(first exstore.Chunk, n uint64) bool {
	return s.table.Load().RulesOut(first, n)
}

// Err implements exstore.Store.
func (s *Store) Err() error {
	if p := s.invalid.Load(); p != nil {
		return p
	}
	return nil // not a typed nil pointer, which would be a non-nil error
}

// Walk implements exstore.Store. fn must not call back into the store.
func (s *Store) Walk(fn func(exstore.Exception) bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	s.table.Load().Range(func(old, new exstore.Chunk, n uint64) bool {
		for i := uint64(0); i < n; i++ {
			if !fn(exstore.Exception{Old: old + exstore.Chunk(i), New: new + exstore.Chunk(i)}) {
				return false
			}
		}
		return true
	})
}

// Usage implements exstore.Store with the kernel's figures.
func (s *Store) Usage() exstore.Usage {
	s.allocMu.Lock()
	nf, area := s.nextFree, s.currentArea
	s.allocMu.Unlock()
	s.mu.RLock()
	n := s.table.Load().Len()
	s.mu.RUnlock()
	c := uint64(s.geo.ChunkSectors)
	return exstore.Usage{
		AllocatedSectors: nf * c,
		TotalSectors:     uint64(s.dev.Size()) / exstore.SectorSize,
		MetadataSectors:  (area + 2) * c,
		Exceptions:       n,
	}
}

// Prepare implements exstore.Store.
func (s *Store) Prepare(ctx context.Context, old exstore.Chunk) (exstore.Exception, error) {
	return s.prepare(ctx, old, nil, 0)
}

// PrepareIfUnchanged implements exstore.ConditionalPreparer: the word is
// checked under allocMu, which Unsettled takes too.
func (s *Store) PrepareIfUnchanged(ctx context.Context, old exstore.Chunk, word *atomic.Uint64, want uint64) (exstore.Exception, error) {
	return s.prepare(ctx, old, word, want)
}

// Unsettled implements exstore.ConditionalPreparer.
func (s *Store) Unsettled() int {
	s.allocMu.Lock()
	defer s.allocMu.Unlock()
	return s.unsettled
}

// prepare is Prepare, conditional on *word == want if word is not nil.
func (s *Store) prepare(ctx context.Context, old exstore.Chunk, word *atomic.Uint64, want uint64) (exstore.Exception, error) {
	if err := ctx.Err(); err != nil {
		return exstore.Exception{}, err
	}
	if old > exstore.MaxChunk {
		return exstore.Exception{}, s.errf("chunk %d: beyond the 2^56 chunk limit", old)
	}
	if err := s.Err(); err != nil {
		return exstore.Exception{}, err
	}
	// A first write's chunk has none: the filter says so without mu.
	if _, exists, _, _ := s.Lookup(ctx, old); exists {
		return exstore.Exception{}, s.errf("chunk %d: %w", old, exstore.ErrExists)
	}
	s.allocMu.Lock()
	defer s.allocMu.Unlock()
	if word != nil && word.Load() != want {
		return exstore.Exception{}, s.errf("chunk %d: %w", old, exstore.ErrChanged)
	}
	if s.closed {
		return exstore.Exception{}, s.errf("%w", exstore.ErrClosed)
	}
	if _, dup := s.pendingOld[old]; dup {
		return exstore.Exception{}, s.errf("chunk %d: an exception for it is already being prepared", old)
	}
	g := s.geo
	if s.nextFree >= g.Chunks {
		return exstore.Exception{}, s.errf("chunk %d: %w (%d chunks in use)", old, exstore.ErrNoSpace, g.Chunks)
	}
	// The record this exception will take: if it fills an area, that area's
	// successor must exist or the metadata could not be loaded again.
	rec := s.currentArea*g.PerArea + s.committed + s.reserved
	if rec%g.PerArea == g.PerArea-1 && uint64(g.AreaLocation(rec/g.PerArea+1)) >= g.Chunks {
		return exstore.Exception{}, s.errf("chunk %d: %w (the last metadata area may not fill: no room for its successor)", old, exstore.ErrNoSpace)
	}
	e := exstore.Exception{Old: old, New: exstore.Chunk(s.nextFree)}
	s.nextFree = g.skipMetadata(s.nextFree + 1)
	p := &prepared{e: e}
	s.queue = append(s.queue, p)
	s.byNew[e.New] = p
	s.pendingOld[old] = struct{}{}
	s.reserved++
	s.unsettled++
	return e, nil
}

// pendingLocked returns e's record if e is what a Prepare returned and is
// neither committed nor aborted yet, else nil. The caller holds allocMu.
func (s *Store) pendingLocked(e exstore.Exception) *prepared {
	p := s.byNew[e.New]
	if p == nil || p.e != e || p.ready || p.aborted {
		return nil
	}
	return p
}

// Commit implements exstore.Store.
func (s *Store) Commit(ctx context.Context, e exstore.Exception) error {
	s.allocMu.Lock()
	p := s.pendingLocked(e)
	if p == nil {
		s.allocMu.Unlock()
		return s.errf("commit %v: %w", e, exstore.ErrNotPrepared)
	}
	p.ready = true
	p.done = make(chan error, 1)
	s.durableWaiting++
	s.allocMu.Unlock()
	s.kick()
	select {
	case err := <-p.done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// lazyKick is how many lazily committed exceptions may wait before the
// committer writes them without a Sync: it bounds what a Sync (or a crash)
// finds to do.
const lazyKick = 4096

// CommitLazy implements exstore.LazyCommitter: e is in the table when it
// returns, and is written with the next batch (which a Sync, a Commit or
// lazyKick waiting exceptions start).
func (s *Store) CommitLazy(ctx context.Context, e exstore.Exception) error {
	s.allocMu.Lock()
	p := s.pendingLocked(e)
	if p == nil {
		s.allocMu.Unlock()
		return s.errf("commit %v: %w", e, exstore.ErrNotPrepared)
	}
	p.ready, p.lazy = true, true
	s.unsettled--
	s.lazyWaiting++
	s.lazyLast = max(s.lazyLast, e.New)
	if uint64(e.New) < s.lazyFirst {
		s.lazyFirst = uint64(e.New)
		s.lazyFirstNow.Store(s.lazyFirst)
	}
	kick := s.lazyWaiting >= lazyKick || s.durableWaiting > 0 || s.syncWaiting > 0
	// In the table under allocMu, so that no batch can write it and look
	// for it in the table in between.
	err := s.insert(s.table.Load(), []exstore.Exception{e}, true)
	s.allocMu.Unlock()
	if kick {
		s.kick()
	}
	return err
}

// Durable implements exstore.LazyCommitter.
func (s *Store) Durable(new exstore.Chunk) bool {
	return uint64(new) < s.lazyFirstNow.Load()
}

// Sync implements exstore.LazyCommitter. With lazily committed exceptions
// waiting, it has the committer write a batch that starts after the call
// (whose flush covers every COW write before the call) and waits until
// those exceptions are written; otherwise it flushes the device itself.
func (s *Store) Sync(ctx context.Context) error {
	s.allocMu.Lock()
	last, started := s.lazyLast, s.batchesStarted
	s.syncWaiting++
	s.allocMu.Unlock()
	defer func() {
		s.allocMu.Lock()
		s.syncWaiting--
		s.allocMu.Unlock()
	}()
	for {
		s.allocMu.Lock()
		lazyDone := s.lazyFirst > uint64(last)
		flushed := s.batchesDone > started
		end, closed := s.batchEnd, s.closed
		s.allocMu.Unlock()
		if err := s.Err(); err != nil {
			return err
		}
		if closed && !lazyDone {
			return s.errf("sync: %w", exstore.ErrClosed)
		}
		switch {
		case lazyDone && flushed:
			return nil
		case lazyDone:
			if err := s.dev.Sync(); err != nil {
				return s.errf("sync: %w", err)
			}
			return nil
		}
		s.kick()
		select {
		case <-end:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Abort implements exstore.Store.
func (s *Store) Abort(e exstore.Exception) bool {
	s.allocMu.Lock()
	p := s.pendingLocked(e)
	if p == nil {
		s.allocMu.Unlock()
		return false
	}
	p.aborted = true
	s.reserved--
	s.unsettled--
	// Its origin chunk may be prepared again at once, although the record
	// stays queued (for the order of COW chunks) until a batch drops it.
	delete(s.pendingOld, e.Old)
	s.allocMu.Unlock()
	s.kick()
	return true
}

func (s *Store) kick() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

func (s *Store) start() { go s.committer() }

// committer writes batches: every commit that arrives while a batch is being
// written joins the next one, so the number of syncs per exception falls as
// the load rises.
func (s *Store) committer() {
	defer close(s.stopped)
	for {
		select {
		case <-s.wake:
		case <-s.stop:
			return
		}
		for s.commitBatch() {
		}
	}
}

// takeReady pops the in-order prefix of the queue that is ready or aborted.
func (s *Store) takeReady() []*prepared {
	s.allocMu.Lock()
	defer s.allocMu.Unlock()
	i := 0
	for i < len(s.queue) && (s.queue[i].ready || s.queue[i].aborted) {
		i++
	}
	if i == 0 {
		return nil
	}
	batch := make([]*prepared, 0, i)
	for _, p := range s.queue[:i] {
		delete(s.byNew, p.e.New)
		if p.ready {
			if p.lazy {
				s.lazyWaiting--
			} else {
				s.durableWaiting--
			}
			batch = append(batch, p)
		}
		// Aborted ones left pendingOld at Abort, and their origin chunk
		// may be pending again (ready ones stay marked until their record
		// is in the table).
	}
	s.queue = append(s.queue[:0], s.queue[i:]...)
	if len(batch) > 0 {
		s.batchesStarted++
	}
	return batch
}

// batchWritten records the end of a batch: the lazily committed exceptions
// still waiting are those left in the queue. The caller holds allocMu.
func (s *Store) batchWrittenLocked() {
	first := uint64(noLazy)
	for _, p := range s.queue {
		if p.lazy {
			first = uint64(p.e.New)
			break
		}
	}
	s.lazyFirst = first
	s.lazyFirstNow.Store(first)
	s.batchesDone++
	close(s.batchEnd)
	s.batchEnd = make(chan struct{})
}

// commitBatch writes one batch and reports whether it found work.
func (s *Store) commitBatch() bool {
	s.metaMu.Lock()
	defer s.metaMu.Unlock()
	batch := s.takeReady()
	if batch == nil {
		return false
	}
	if len(batch) == 0 { // only aborts
		return true
	}
	err := s.Err()
	if err == nil {
		recs := make([]exstore.Exception, len(batch))
		for i, p := range batch {
			recs[i] = p.e
		}
		written, werr := s.writeRecords(recs)
		if werr != nil {
			err, _ = s.invalidate(fmt.Errorf("commit of %d exceptions: %w", len(recs), werr))
			s.allocMu.Lock()
			s.reserved -= uint64(len(recs) - written)
			s.allocMu.Unlock()
		} else {
			// Lazily committed ones are in the table already.
			recs = recs[:0]
			for _, p := range batch {
				if !p.lazy {
					recs = append(recs, p.e)
				}
			}
			err = s.insert(s.table.Load(), recs, true)
		}
	} else {
		s.allocMu.Lock()
		s.reserved -= uint64(len(batch))
		s.allocMu.Unlock()
	}
	s.allocMu.Lock()
	for _, p := range batch {
		delete(s.pendingOld, p.e.Old)
		if !p.lazy {
			s.unsettled-- // written or failed: its Commit returns
		}
	}
	if err == nil {
		s.batchWrittenLocked()
	} else {
		// Nothing more will be written; Sync sees the store invalid.
		s.batchesDone++
		close(s.batchEnd)
		s.batchEnd = make(chan struct{})
	}
	s.allocMu.Unlock()
	for _, p := range batch {
		if p.done != nil {
			p.done <- err
		}
	}
	return true
}

// areaWrite is one area's part of a batch.
type areaWrite struct {
	area     uint64
	from, to uint64 // record slots written
	recs     []exstore.Exception
}

// writeRecords appends recs to the metadata with the kernel's ordering:
// zero the successor of every area the batch fills, flush (so the data the
// records point to, and those zeroes, are durable), then write each touched
// area durably, in order. It returns how many records were written before
// an error. The caller holds metaMu.
func (s *Store) writeRecords(recs []exstore.Exception) (int, error) {
	g := s.geo
	s.allocMu.Lock()
	area, slot := s.currentArea, s.committed
	s.allocMu.Unlock()
	continuesTail := true
	if slot == g.PerArea { // merge stepped back into a full area
		area, slot, continuesTail = area+1, 0, false
	}

	var writes []areaWrite
	for rest := recs; len(rest) > 0; {
		n := min(uint64(len(rest)), g.PerArea-slot)
		writes = append(writes, areaWrite{area: area, from: slot, to: slot + n, recs: rest[:n]})
		rest = rest[n:]
		if slot+n == g.PerArea {
			area, slot = area+1, 0
		} else {
			slot += n
		}
	}
	for _, w := range writes {
		if w.to == g.PerArea {
			if err := s.zeroChunk(g.AreaLocation(w.area + 1)); err != nil {
				return 0, fmt.Errorf("zero metadata area %d: %w", w.area+1, err)
			}
		}
	}
	if err := s.dev.Sync(); err != nil {
		return 0, fmt.Errorf("flush before metadata write: %w", err)
	}
	written := 0
	for i, w := range writes {
		if err := s.writeArea(w, i == 0 && continuesTail); err != nil {
			return written, err
		}
		written += len(w.recs)
		// The area position and the reservation move together, so Prepare
		// never counts a record twice.
		s.allocMu.Lock()
		if w.to == g.PerArea {
			s.currentArea, s.committed = w.area+1, 0
		} else {
			s.currentArea, s.committed = w.area, w.to
		}
		s.reserved -= uint64(len(w.recs))
		s.allocMu.Unlock()
		s.lastRec, s.hasLastRec = w.recs[len(w.recs)-1], true
	}
	return written, nil
}

// writeArea writes the aligned blocks of one area that hold slots
// [from, to), durably. Blocks are rebuilt from the tail block (records before
// from) and the new records; anything after them is zero, which also clears
// stale records past the terminator up to dirtyTo.
func (s *Store) writeArea(w areaWrite, continuesTail bool) error {
	a := int64(s.align)
	start := int64(w.from*RecordSize) / a * a
	end := int64(w.to * RecordSize)
	if continuesTail {
		end = max(end, s.dirtyTo)
	}
	end = min((end+a-1)/a*a, s.geo.ChunkBytes)
	if int64(cap(s.writeBuf)) < end-start {
		s.writeBuf = blockdev.AlignedBuffer(int(end-start), s.align)
	}
	buf := s.writeBuf[:end-start]
	clear(buf)
	if continuesTail {
		copy(buf, s.tail)
	}
	for i, r := range w.recs {
		EncodeRecord(buf, int(w.from-uint64(start)/RecordSize)+i, r)
	}
	if _, err := s.dev.WriteAtSync(buf, s.areaOffset(w.area)+start); err != nil {
		return fmt.Errorf("write metadata area %d (chunk %d): %w", w.area, s.geo.AreaLocation(w.area), err)
	}
	if continuesTail {
		s.dirtyTo = 0
	}
	// Keep the block that holds the next free slot as the new tail.
	if w.to == s.geo.PerArea {
		clear(s.tail)
	} else {
		last := int64(w.to*RecordSize) / a * a
		copy(s.tail, buf[last-start:])
		clear(s.tail[int64(w.to*RecordSize)-last:])
	}
	return nil
}

// Invalidate implements exstore.Store: the header's valid flag is set to 0
// durably, and every later Prepare and Commit fails.
func (s *Store) Invalidate(ctx context.Context, reason error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	s.metaMu.Lock()
	defer s.metaMu.Unlock()
	_, err := s.invalidate(reason)
	return err
}

// invalidate records reason, unless the store is invalid already, and
// writes the header. It returns the error commits should see, and the error
// of the header write. The caller holds metaMu.
func (s *Store) invalidate(reason error) (invalid, writeErr error) {
	if !s.invalid.CompareAndSwap(nil, &exstore.InvalidError{Device: s.name, Reason: reason}) {
		return s.Err(), nil // invalid already: keep the first reason
	}
	invalid = s.Err()
	if writeErr = s.writeHeader(0); writeErr != nil {
		s.log.Error("could not write the invalid flag", "cow", s.name, "err", writeErr)
	}
	return invalid, writeErr
}

// PrepareMerge implements exstore.Store as the kernel's prepare_merge: the
// last record, and how many records before it in the same area continue it
// backwards in both old and new chunk.
func (s *Store) PrepareMerge(ctx context.Context) (exstore.Exception, int, error) {
	s.metaMu.Lock()
	defer s.metaMu.Unlock()
	if err := s.Err(); err != nil {
		return exstore.Exception{}, 0, err
	}
	s.allocMu.Lock()
	busy := len(s.queue) > 0
	area, committed := s.currentArea, s.committed
	s.allocMu.Unlock()
	if busy {
		return exstore.Exception{}, 0, s.errf("%w: exceptions are being committed", exstore.ErrMerge)
	}
	s.merge.n = 0
	if committed == 0 {
		if area == 0 {
			return exstore.Exception{}, 0, nil
		}
		area, committed = area-1, s.geo.PerArea
		s.allocMu.Lock()
		s.currentArea, s.committed = area, committed
		s.allocMu.Unlock()
		if err := s.loadTailAt(); err != nil {
			return exstore.Exception{}, 0, err
		}
	}
	const window = 4096
	var last exstore.Exception
	n := 0
	for hi := committed; hi > 0; {
		if err := ctx.Err(); err != nil {
			return exstore.Exception{}, 0, err
		}
		lo := hi - min(hi, window)
		recs, err := s.readSlots(area, lo, hi)
		if err != nil {
			return exstore.Exception{}, 0, err
		}
		for i := len(recs) - 1; i >= 0; i-- {
			r := recs[i]
			if n == 0 {
				last, n = r, 1
				continue
			}
			if r.Old+exstore.Chunk(n) != last.Old || r.New+exstore.Chunk(n) != last.New {
				s.merge.last, s.merge.n = last, n
				return last, n, nil
			}
			n++
		}
		hi = lo
	}
	s.merge.last, s.merge.n = last, n
	return last, n, nil
}

// loadTailAt reloads the tail block after the area position moved back.
func (s *Store) loadTailAt() error {
	s.allocMu.Lock()
	defer s.allocMu.Unlock()
	if s.committed == s.geo.PerArea {
		// A full area stepped back into for merging: the tail is empty
		// until CommitMerge clears records.
		clear(s.tail)
		return nil
	}
	return s.loadTail()
}

// readSlots reads records [lo, hi) of an area.
func (s *Store) readSlots(area, lo, hi uint64) ([]exstore.Exception, error) {
	blk := uint64(s.align / RecordSize)
	first := lo - lo%blk
	last := (hi + blk - 1) / blk * blk
	b, err := s.readAt(s.areaOffset(area)+int64(first*RecordSize), int((last-first)*RecordSize))
	if err != nil {
		return nil, s.errf("read metadata area %d: %w", area, err)
	}
	out := make([]exstore.Exception, 0, hi-lo)
	for i := lo; i < hi; i++ {
		out = append(out, DecodeRecord(b, int(i-first)))
	}
	return out, nil
}

// CommitMerge implements exstore.Store as the kernel's commit_merge: the last
// n records are zeroed and the area written with flush and FUA; next_free
// becomes the in-order value after the remaining records.
func (s *Store) CommitMerge(ctx context.Context, n int) error {
	s.metaMu.Lock()
	defer s.metaMu.Unlock()
	if err := s.Err(); err != nil {
		return err
	}
	if n <= 0 || n > s.merge.n {
		return s.errf("%w: commit of %d merged exceptions, but the last prepare returned %d", exstore.ErrMerge, n, s.merge.n)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	s.allocMu.Lock()
	area, committed := s.currentArea, s.committed
	s.allocMu.Unlock()
	from := committed - uint64(n)
	// The origin writes of the merged data must be durable before the
	// records go; the caller flushed the origin, this flushes the COW.
	if err := s.dev.Sync(); err != nil {
		return s.errf("flush before merge commit: %w", err)
	}
	a := uint64(s.align)
	start := from * RecordSize / a * a
	end := min((committed*RecordSize+a-1)/a*a, uint64(s.geo.ChunkBytes))
	head, err := s.readAt(s.areaOffset(area)+int64(start), int(end-start))
	if err != nil {
		return s.errf("read metadata area %d: %w", area, err)
	}
	clear(head[from*RecordSize-start:])
	if _, err := s.dev.WriteAtSync(head, s.areaOffset(area)+int64(start)); err != nil {
		return s.errf("write metadata area %d: %w", area, err)
	}
	last := s.merge.last
	s.mu.Lock()
	s.table.Load().Remove(last.Old-exstore.Chunk(n-1), uint64(n))
	s.mu.Unlock()
	s.merge.n -= n
	s.merge.last = exstore.Exception{Old: last.Old - exstore.Chunk(n), New: last.New - exstore.Chunk(n)}

	s.allocMu.Lock()
	s.committed = from
	s.nextFree = s.geo.skipMetadata(uint64(s.geo.AreaLocation(area)) + from + 1)
	s.allocMu.Unlock()
	s.hasLastRec = false
	if from > 0 {
		recs, err := s.readSlots(area, from-1, from)
		if err != nil {
			return err
		}
		s.lastRec, s.hasLastRec = recs[0], true
	} else if area > 0 {
		recs, err := s.readSlots(area-1, s.geo.PerArea-1, s.geo.PerArea)
		if err != nil {
			return err
		}
		s.lastRec, s.hasLastRec = recs[0], true
	}
	return s.loadTailAt()
}

// Refresh implements exstore.Store: it re-reads the header, and the metadata
// from the last known area and slot when the last record this store knows is
// still in place (the metadata only grew); otherwise it reloads everything.
func (s *Store) Refresh(ctx context.Context) error {
	s.metaMu.Lock()
	defer s.metaMu.Unlock()
	s.allocMu.Lock()
	// Aborted exceptions leave the queue with the committer's next batch;
	// with metaMu held no batch runs, so they leave here instead.
	for len(s.queue) > 0 && s.queue[0].aborted {
		delete(s.byNew, s.queue[0].e.New)
		s.queue = s.queue[1:]
	}
	busy := len(s.queue) > 0
	area, committed := s.currentArea, s.committed
	s.allocMu.Unlock()
	if busy {
		return s.errf("refresh while exceptions are in flight")
	}
	hb, err := s.readAt(0, s.align)
	if err != nil {
		return s.errf("read header: %w", err)
	}
	h := DecodeHeader(hb)
	if err := h.Check(); err != nil {
		return s.errf("%w", err)
	}
	if h.ChunkSectors != s.geo.ChunkSectors {
		return s.errf("%w: chunk size changed from %d to %d sectors", ErrCorrupt, s.geo.ChunkSectors, h.ChunkSectors)
	}
	if h.Valid == 0 {
		s.invalid.CompareAndSwap(nil, &exstore.InvalidError{Device: s.name, Reason: errors.New("invalidated by another node")})
		return nil
	}
	grew := true
	if s.hasLastRec {
		a, slot := area, committed
		if slot == 0 {
			a, slot = a-1, s.geo.PerArea
		}
		recs, err := s.readSlots(a, slot-1, slot)
		if err != nil {
			return err
		}
		grew = recs[0] == s.lastRec
	}
	if grew {
		return s.scan(ctx, area, committed, false)
	}
	return s.reload(ctx)
}

// reload loads the metadata again from the start, replacing the table and
// the area position only once the new ones are complete. The caller holds
// metaMu.
func (s *Store) reload(ctx context.Context) error {
	s.hasLastRec, s.dirtyTo, s.merge.n = false, 0, 0
	return s.scan(ctx, 0, 0, true)
}

// Close implements exstore.Store. Commits still waiting fail with exstore.ErrClosed.
func (s *Store) Close() error {
	s.stopOnce.Do(func() {
		// Lazily committed exceptions are written first: a Close is
		// not a crash.
		if s.lazyFirstNow.Load() != noLazy {
			if err := s.Sync(context.Background()); err != nil {
				s.log.Error("close: writing lazily committed exceptions failed", "cow", s.name, "err", err)
			}
		}
		close(s.stop)
		<-s.stopped
		s.metaMu.Lock()
		defer s.metaMu.Unlock()
		s.allocMu.Lock()
		s.closed = true
		q := s.queue
		s.queue = nil
		for _, p := range q {
			if p.ready && !p.lazy {
				s.unsettled-- // its Commit fails
			}
		}
		s.allocMu.Unlock()
		for _, p := range q {
			if p.ready && p.done != nil {
				p.done <- s.errf("%w", exstore.ErrClosed)
			}
		}
	})
	return nil
}
