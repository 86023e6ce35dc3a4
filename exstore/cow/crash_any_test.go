package cow

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev/faultdev"
	"github.com/clustersnap/clustersnap/persistent"
)

// sectorHistory is what a volume may read, sector by sector, after a power
// cut: for each 512-byte sector the contents it held after each write that
// reached it (index 0: its content when the workload began, durable), the
// newest one a completed write left, and the newest one known durable. A
// sector must read one of its versions from the durable one on. Each
// sector is written by one worker only, so its versions are in the order
// the writes happened.
type sectorHistory struct {
	mu        sync.Mutex
	cur       []byte     // the volume's content after every write issued
	versions  [][][]byte // per sector, its contents in write order
	completed []int      // per sector, the version of the newest completed write
	durable   []int      // per sector, the newest version known durable
}

func newSectorHistory(content []byte) *sectorHistory {
	n := (len(content) + exstore.SectorSize - 1) / exstore.SectorSize
	h := &sectorHistory{
		cur:       bytes.Clone(content),
		versions:  make([][][]byte, n),
		completed: make([]int, n),
		durable:   make([]int, n),
	}
	for s := range n {
		h.versions[s] = [][]byte{bytes.Clone(h.sector(s))}
	}
	return h
}

// sector returns sector s of the current content; the last one may be short.
func (h *sectorHistory) sector(s int) []byte {
	return h.cur[s*exstore.SectorSize : min((s+1)*exstore.SectorSize, len(h.cur))]
}

// sectorSpanOf returns the sectors [first, last] that a write of n bytes at
// off touches.
func sectorSpanOf(off int64, n int) (first, last int) {
	return int(off / exstore.SectorSize), int((off + int64(n) - 1) / exstore.SectorSize)
}

// issue records a write of p at off about to be issued: from now on the
// sectors it touches may read what it leaves. It returns the version of
// each touched sector the write makes.
func (h *sectorHistory) issue(p []byte, off int64) []int {
	h.mu.Lock()
	defer h.mu.Unlock()
	copy(h.cur[off:], p)
	first, last := sectorSpanOf(off, len(p))
	idx := make([]int, 0, last-first+1)
	for s := first; s <= last; s++ {
		h.versions[s] = append(h.versions[s], bytes.Clone(h.sector(s)))
		idx = append(idx, len(h.versions[s])-1)
	}
	return idx
}

// complete records that the write issued at off returned without error;
// fua says it was durable when it returned.
func (h *sectorHistory) complete(off int64, idx []int, fua bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	first := int(off / exstore.SectorSize)
	for i, v := range idx {
		h.completed[first+i] = v
		if fua {
			h.durable[first+i] = max(h.durable[first+i], v)
		}
	}
}

// flushStart returns the versions that completed writes have left, which a
// Flush beginning now makes durable when it returns without error.
func (h *sectorHistory) flushStart() []int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]int(nil), h.completed...)
}

// flushed records that a Flush that began at covered returned.
func (h *sectorHistory) flushed(covered []int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for s, v := range covered {
		h.durable[s] = max(h.durable[s], v)
	}
}

// durableWrites counts the sectors whose durable version is one the
// workload wrote.
func (h *sectorHistory) durableWrites() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, d := range h.durable {
		if d > 0 {
			n++
		}
	}
	return n
}

// check reports the first sector of got that is none of its versions from
// the durable one on, and whether one is.
func (h *sectorHistory) check(got []byte) (string, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for s := range h.versions {
		sec := got[s*exstore.SectorSize : min((s+1)*exstore.SectorSize, len(got))]
		ok := false
		for _, v := range h.versions[s][h.durable[s]:] {
			if bytes.Equal(sec, v) {
				ok = true
				break
			}
		}
		if ok {
			continue
		}
		older := -1
		for i, v := range h.versions[s][:h.durable[s]] {
			if bytes.Equal(sec, v) {
				older = i
			}
		}
		return fmt.Sprintf("sector %d reads none of versions %d..%d (of %d); it reads version %d (-1: none)",
			s, h.durable[s], len(h.versions[s])-1, len(h.versions[s]), older), false
	}
	return "", true
}

// lazyCommitStore is a broken store for the checker's mutation test: its
// Commit only commits lazily and it reports every exception durable, so
// the engine overwrites origin chunks whose copies are not yet recorded
// durably.
type lazyCommitStore struct {
	*persistent.Store
}

func (s lazyCommitStore) Commit(ctx context.Context, e exstore.Exception) error {
	return s.CommitLazy(ctx, e)
}

func (s lazyCommitStore) Durable(exstore.Chunk) bool { return true }

// crashRound is one round of the crash test: its seed, the stores its
// snapshots use and the volumes its workload writes to.
type crashRound struct {
	seed uint64
	// wrap turns a snapshot's persistent store into the store the engine
	// uses.
	wrap func(*persistent.Store) exstore.Store
	// serve, if not nil, wraps each volume the workload writes to.
	serve func(volume) volume
}

// crashVolume is an origin or a snapshot under the crash workload.
type crashVolume struct {
	name    string
	v       volume
	history *sectorHistory
}

const (
	crashRounds     = 40
	crashWorkers    = 3
	crashOriginSize = 643 * exstore.SectorSize // not a multiple of any chunk size but 1 sector
	crashMaxOps     = 700                      // the cut comes at an operation in [1, crashMaxOps]
)

// runCrashRound runs the workload of round r, cuts the power at a random
// device operation, reloads every store from what survived and returns
// the first violation it finds, or "" if none.
func runCrashRound(t *testing.T, r crashRound) string {
	t.Helper()
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(r.seed, 1600))
	originDev := newOriginDev(rng, crashOriginSize)
	o := NewOrigin(originDev)
	originContent := originDev.Bytes()

	// The snapshots' chunk sizes differ; their COW devices hold a copy of
	// every chunk and room for metadata, so none fills and none is
	// invalidated.
	sizes := []uint32{1, 2, 4, 8, 16, 32}
	rng.Shuffle(len(sizes), func(i, j int) { sizes[i], sizes[j] = sizes[j], sizes[i] })
	nSnaps := 2 + rng.IntN(2)
	type snapDevs struct {
		cow   *faultdev.Device
		store *persistent.Store
	}
	var devs []snapDevs
	var taken [][]byte // each snapshot's content: the origin's when it was taken
	vols := []*crashVolume{{name: "origin", v: o}}
	for i, cs := range sizes[:nSnaps] {
		name := fmt.Sprintf("s%d-chunk%d", i, cs)
		cow := faultdev.New(name, crashOriginSize*2+256<<10)
		ps, err := persistent.Open(ctx, cow, persistent.Options{ChunkSectors: cs, Logger: testLogger(t)})
		require.NoError(t, err)
		t.Cleanup(func() { _ = ps.Close() })
		snap, err := o.AddSnapshot(name, r.wrap(ps), cow, SnapshotOptions{})
		require.NoError(t, err)
		devs = append(devs, snapDevs{cow: cow, store: ps})
		vols = append(vols, &crashVolume{name: name, v: snap})
		taken = append(taken, bytes.Clone(originContent))
		// Some origin writes between snapshots, so that they differ.
		for range rng.IntN(4) {
			off, n := crashPick(rng, 0, crashOriginSize)
			p := randomBytes(rng, n)
			require.NoError(t, o.WriteAt(ctx, p, off, false))
			copy(originContent[off:], p)
		}
	}
	// The workload starts from a durable state.
	require.NoError(t, o.Flush(ctx))
	vols[0].history = newSectorHistory(originContent)
	for i, cv := range vols[1:] {
		require.NoError(t, cv.v.Flush(ctx))
		requireSame(t, taken[i], readAll(t, cv.v), cv.name+" before the workload")
		cv.history = newSectorHistory(taken[i])
	}

	if r.serve != nil {
		for _, cv := range vols {
			cv.v = r.serve(cv.v)
		}
	}

	var ops atomic.Int64
	var powerOff atomic.Bool
	threshold := 1 + rng.Int64N(crashMaxOps)
	cut := func(faultdev.Op, int64, int64) error {
		if ops.Add(1) >= threshold {
			powerOff.Store(true)
		}
		if powerOff.Load() {
			return errPowerOff
		}
		return nil
	}
	originDev.SetFault(cut)
	for _, d := range devs {
		d.cow.SetFault(cut)
	}

	// Each worker writes only its own region of every volume, so a
	// sector's versions are in write order; the regions do not follow
	// chunk boundaries, so workers share chunks.
	region := int64(crashOriginSize / crashWorkers / exstore.SectorSize * exstore.SectorSize)
	// The rounds mix origin and snapshot operations in different
	// proportions: copies into a snapshot sync its COW, which makes its
	// own writes durable too, so the snapshots' durability is only checked
	// where origin writes are rare.
	originEighths := []int{1, 4, 7}[r.seed%3]
	errs := make([]error, crashWorkers)
	var wg sync.WaitGroup
	for w := range crashWorkers {
		lo, hi := int64(w)*region, int64(w+1)*region
		if w == crashWorkers-1 {
			hi = crashOriginSize
		}
		wrng := rand.New(rand.NewPCG(r.seed, uint64(w)))
		wg.Go(func() {
			for {
				cv := vols[0]
				if wrng.IntN(8) >= originEighths {
					cv = vols[1+wrng.IntN(len(vols)-1)]
				}
				var err error
				if wrng.IntN(8) == 0 {
					covered := cv.history.flushStart()
					if err = cv.v.Flush(ctx); err == nil {
						cv.history.flushed(covered)
					}
				} else {
					off, n := crashPick(wrng, lo, hi)
					p := randomBytes(wrng, n)
					fua := wrng.IntN(4) == 0
					idx := cv.history.issue(p, off)
					if err = cv.v.WriteAt(ctx, p, off, fua); err == nil {
						cv.history.complete(off, idx, fua)
					}
				}
				if err != nil {
					errs[w] = fmt.Errorf("%s: %w", cv.name, err)
					return
				}
			}
		})
	}
	wg.Wait()
	require.True(t, powerOff.Load(), "the workload ended before the cut: %v", errs)

	cutRng := rand.New(rand.NewPCG(r.seed, 1601))
	for _, d := range devs {
		require.NoError(t, d.store.Close())
	}
	reloadedDev := originDev.PowerCut(cutRng)
	reloaded := NewOrigin(reloadedDev)
	got := []*crashVolume{{name: "origin", v: reloaded}}
	for i, d := range devs {
		cow := d.cow.PowerCut(cutRng)
		store, err := persistent.Open(ctx, cow, persistent.Options{Logger: testLogger(t)})
		require.NoError(t, err, "reload %s", vols[1+i].name)
		t.Cleanup(func() { _ = store.Close() })
		require.NoError(t, store.Err(), "%s is invalid after the cut", vols[1+i].name)
		snap, err := reloaded.AddSnapshot(vols[1+i].name, store, cow, SnapshotOptions{})
		require.NoError(t, err)
		got = append(got, &crashVolume{name: vols[1+i].name, v: snap})
	}
	var durable int
	for i, cv := range vols {
		if msg, ok := cv.history.check(readAll(t, got[i].v)); !ok {
			return fmt.Sprintf("%s after a cut at operation %d: %s", cv.name, threshold, msg)
		}
		durable += cv.history.durableWrites()
	}
	t.Logf("cut at operation %d; %d sectors checked for an acknowledged-durable write", threshold, durable)
	return ""
}

// crashPick returns a write of 1 byte to 24 KiB in [lo, hi): half of them
// whole sectors, the others at any byte.
func crashPick(rng *rand.Rand, lo, hi int64) (off int64, n int) {
	maxLen := min(hi-lo, 24<<10)
	if rng.IntN(2) == 0 {
		sectors := (hi - lo) / exstore.SectorSize
		k := 1 + rng.Int64N(min(sectors, maxLen/exstore.SectorSize))
		return lo + exstore.SectorSize*rng.Int64N(sectors-k+1), int(k * exstore.SectorSize)
	}
	n = 1 + rng.IntN(int(maxLen))
	return lo + rng.Int64N(hi-lo-int64(n)+1), n
}

func persistentStore(ps *persistent.Store) exstore.Store { return ps }

// TestCrashAtAnyOperation cuts the power at a random operation on any
// device (origin or COW) in the middle of concurrent origin and snapshot
// writes, some with FUA, and flushes of every volume. Every unsynced
// sector then independently survives or not. After reloading every store,
// each sector of the origin and of every snapshot reads its newest
// durably acknowledged content (a FUA write that returned, or a write that
// completed before a Flush of its volume began that then returned) or
// content written after it: the snapshot sectors no snapshot write
// touched read exactly as the origin did when the snapshot was taken.
func TestCrashAtAnyOperation(t *testing.T) {
	rounds := uint64(crashRounds)
	if testing.Short() {
		rounds = 10
	}
	for seed := range rounds {
		t.Run(fmt.Sprintf("seed%d", seed), func(t *testing.T) {
			if msg := runCrashRound(t, crashRound{seed: seed, wrap: persistentStore}); msg != "" {
				t.Fatal(msg)
			}
		})
	}
}

func lazyCommit(ps *persistent.Store) exstore.Store { return lazyCommitStore{ps} }

// fuaDroppingVolume is a broken volume for the checker's mutation test: it
// passes every write on without FUA.
type fuaDroppingVolume struct{ volume }

func (v fuaDroppingVolume) WriteAt(ctx context.Context, p []byte, off int64, _ bool) error {
	return v.volume.WriteAt(ctx, p, off, false)
}

// flushIgnoringVolume is a broken volume for the checker's mutation test:
// its Flush does nothing.
type flushIgnoringVolume struct{ volume }

func (flushIgnoringVolume) Flush(context.Context) error { return nil }

// onSnapshots applies wrap to snapshots and leaves the origin alone.
func onSnapshots(wrap func(volume) volume) func(volume) volume {
	return func(v volume) volume {
		if _, ok := v.(*Snapshot); ok {
			return wrap(v)
		}
		return v
	}
}

// mutantRounds bounds the seeds a mutant gets before the checker is said
// to have missed it. Some mutants show only in a round whose cut lands
// between an unforced write and the flush that should have covered it,
// with no FUA write's sync of the store covering it first; the first such
// seed is usually below 40, and each round takes milliseconds.
const mutantRounds = 200

// TestCrashCheckerCatchesMutants proves the crash checker's power: each
// broken store or volume breaks the durability contract, and the checker
// must see it within mutantRounds seeds of the rounds
// TestCrashAtAnyOperation runs.
func TestCrashCheckerCatchesMutants(t *testing.T) {
	for _, tc := range []struct {
		name  string
		round func(seed uint64) crashRound
	}{
		// Commit returns before the exception is durable: the engine
		// overwrites origin chunks whose copies a cut may lose.
		{"lazy-commit", func(seed uint64) crashRound { return crashRound{seed: seed, wrap: lazyCommit} }},
		// Acknowledged FUA writes are not durable.
		{"fua-dropped", func(seed uint64) crashRound {
			return crashRound{seed: seed, wrap: persistentStore, serve: func(v volume) volume { return fuaDroppingVolume{v} }}
		}},
		// Acknowledged flushes make nothing durable.
		{"flush-ignored", func(seed uint64) crashRound {
			return crashRound{seed: seed, wrap: persistentStore, serve: func(v volume) volume { return flushIgnoringVolume{v} }}
		}},
		// The same, on the snapshots only.
		{"snapshot-fua-dropped", func(seed uint64) crashRound {
			return crashRound{seed: seed, wrap: persistentStore, serve: onSnapshots(func(v volume) volume { return fuaDroppingVolume{v} })}
		}},
		{"snapshot-flush-ignored", func(seed uint64) crashRound {
			return crashRound{seed: seed, wrap: persistentStore, serve: onSnapshots(func(v volume) volume { return flushIgnoringVolume{v} })}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			huntMutant(t, func(t *testing.T, seed uint64) string { return runCrashRound(t, tc.round(seed)) })
		})
	}
}

// huntMutant runs round with seeds until it reports a violation (the
// checker caught the mutant), failing the test if none of mutantRounds
// seeds does.
func huntMutant(t *testing.T, round func(t *testing.T, seed uint64) string) {
	t.Helper()
	for seed := range uint64(mutantRounds) {
		var msg string
		t.Run(fmt.Sprintf("seed%d", seed), func(t *testing.T) { msg = round(t, seed) })
		if msg != "" {
			t.Logf("caught at seed %d: %s", seed, msg)
			return
		}
	}
	t.Fatal("the checker missed the mutant")
}
