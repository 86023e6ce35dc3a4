package persistent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
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
	// flushMutant, zero in production, breaks the flush before the
	// metadata write so the crash tests can prove they catch it.
	flushMutant flushMutant

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
	_ exstore.Labeler             = (*Store)(nil)
)

// Open opens the persistent store on cow, formatting it when its first four
// bytes are zero, as the kernel does with a new COW device.
func Open(ctx context.Context, cow blockdev.Device, opts Options) (*Store, error) {
	s, err := newStore(cow, opts)
	if err != nil {
		return nil, err
	}
	h, err := s.readHeader()
	if err != nil {
		return nil, err
	}
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
		// The kernel ignores the label; so does loading, but a damaged
		// one is said (Label refuses it to whoever asks).
		if _, _, err := s.Label(ctx); err != nil {
			s.log.Warn("the COW's label cannot be used", "cow", s.name, "err", err)
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

// readHeader reads and decodes chunk 0; the caller checks what it holds.
func (s *Store) readHeader() (Header, error) {
	b, err := s.readAt(0, s.align)
	if err != nil {
		return Header{}, s.errf("read header: %w", err)
	}
	return DecodeHeader(b), nil
}

// writeHeader writes the header fields with valid, keeping the rest of
// their sector as it is on the device (a label, spec §1.6: the kernel too
// rewrites the header from the buffer it loaded). If that sector cannot be
// read, the header is written alone: the valid flag matters more than the
// label. The caller holds metaMu, or is formatting.
func (s *Store) writeHeader(valid uint32) error {
	b, err := s.readAt(0, s.align)
	if err != nil {
		s.log.Warn("could not read the header sector; writing the header alone, without the label", "cow", s.name, "err", err)
		b = blockdev.AlignedBuffer(s.align, s.align)
	}
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

// ChunkSectors implements exstore.Store.
func (s *Store) ChunkSectors() uint32 { return s.geo.ChunkSectors }

// Geometry returns the device layout.
func (s *Store) Geometry() Geometry { return s.geo }

// Err implements exstore.Store.
func (s *Store) Err() error {
	if p := s.invalid.Load(); p != nil {
		return p
	}
	return nil // not a typed nil pointer, which would be a non-nil error
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
