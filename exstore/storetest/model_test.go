package storetest

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/exstore/blockdev/faultdev"
)

// This file holds a model of the persistent ("P") store's semantics, used to
// test the suite itself: the transient store skips the reload, merge and
// refresh sub-tests, and the suite must pass a correct store and fail
// broken ones (see mutants). The model keeps its "on-disk" records in a Go
// value shared by every instance opened on the same device, and computes
// chunk positions, capacity and usage from the area layout independently of
// the harness formulas, so it also checks that those agree.

// modelDisk is what the model store keeps on "disk": the committed records
// in area order, and the header's valid flag.
type modelDisk struct {
	c       uint32 // the header's chunk size
	mu      sync.Mutex
	records []exstore.Exception
	invalid bool
}

// modelPending is a prepared exception of the model store.
type modelPending struct {
	e       exstore.Exception
	aborted bool
	done    chan error // non-nil once Commit queued it
}

// modelStore implements exstore.Store after the kernel's persistent store,
// in memory. mutant names a deliberate bug (see mutants), "" for none.
type modelStore struct {
	disk    *modelDisk
	dev     blockdev.Device
	c       uint32
	perArea int64 // E
	chunks  int64 // whole chunks on the device
	mutant  string

	mu       sync.Mutex
	table    map[exstore.Chunk]exstore.Chunk
	nextFree exstore.Chunk
	queue    []*modelPending // prepared and not complete, in Prepare order
	freed    []exstore.Chunk // aborted chunks, reused only by the reuseAborted mutant
	invalid  error
	merging  int // n of the last PrepareMerge, 0 if none
	closed   bool
}

// openModel opens a model store on disk, loading its records as the kernel
// does.
func openModel(disk *modelDisk, dev blockdev.Device, c uint32, mutant string) *modelStore {
	s := &modelStore{
		disk: disk, dev: dev, c: c, mutant: mutant,
		perArea: int64(c) * exstore.SectorSize / 16,
		chunks:  dev.Size() / (int64(c) * exstore.SectorSize),
	}
	disk.mu.Lock()
	defer disk.mu.Unlock()
	if disk.invalid && mutant != "invalidNotDurable" {
		s.invalid = &exstore.InvalidError{Device: dev.Name()}
		s.table = make(map[exstore.Chunk]exstore.Chunk)
		s.nextFree = 2
		return s
	}
	s.loadLocked()
	return s
}

// loadLocked rebuilds the table from the disk records, and next_free as the
// kernel's loader does. Callers hold disk.mu.
func (s *modelStore) loadLocked() {
	records := s.disk.records
	if s.mutant == "lostOnReopen" && len(records) > 0 {
		records = records[:len(records)-1]
	}
	s.table = make(map[exstore.Chunk]exstore.Chunk, len(records))
	s.nextFree = 2
	for _, e := range records {
		s.table[e.Old] = e.New
		s.nextFree = max(s.nextFree, e.New+1)
	}
	if s.isArea(s.nextFree) {
		s.nextFree++
	}
}

// isArea reports whether chunk c is the header or a metadata area.
func (s *modelStore) isArea(c exstore.Chunk) bool {
	return c == 0 || (int64(c)-1)%(s.perArea+1) == 0
}

// areaLocation is the chunk of metadata area i.
func (s *modelStore) areaLocation(i int64) exstore.Chunk {
	return exstore.Chunk(1 + (s.perArea+1)*i)
}

func (s *modelStore) ChunkSectors() uint32 { return s.c }

func (s *modelStore) Lookup(_ context.Context, old exstore.Chunk) (exstore.Chunk, bool, exstore.Release, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	n, ok := s.table[old]
	return n, ok, exstore.NoRelease, nil
}

// LookupRange implements exstore.RangeLookuper; the rangeOffByOne mutant
// answers for the chunk after each.
func (s *modelStore) LookupRange(_ context.Context, first exstore.Chunk, into []exstore.LookupResult) (exstore.Release, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i := range into {
		c := first + exstore.Chunk(i)
		if s.mutant == "rangeOffByOne" {
			c++
		}
		n, ok := s.table[c]
		into[i] = exstore.LookupResult{New: n, Found: ok}
	}
	return exstore.NoRelease, nil
}

// LookupOptimistic implements exstore.OptimisticLookuper (the model has
// no other nodes: its token never changes); the optimisticOffByOne mutant
// answers for the chunk after old.
func (s *modelStore) LookupOptimistic(old exstore.Chunk) (exstore.Chunk, bool, uint64, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.mutant == "optimisticOffByOne" {
		old++
	}
	n, ok := s.table[old]
	return n, ok, 7, true
}

// LookupRangeOptimistic implements exstore.OptimisticLookuper.
func (s *modelStore) LookupRangeOptimistic(first exstore.Chunk, into []exstore.LookupResult) (uint64, bool) {
	for i := range into {
		n, ok, _, _ := s.LookupOptimistic(first + exstore.Chunk(i))
		into[i] = exstore.LookupResult{New: n, Found: ok}
	}
	return 7, true
}

// NoExceptions implements exstore.AbsenceChecker; the absenceShort mutant
// does not look at the run's last chunk.
func (s *modelStore) NoExceptions(first exstore.Chunk, n uint64) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.mutant == "absenceShort" {
		n--
	}
	for c := first; c < first+exstore.Chunk(n); c++ {
		if _, ok := s.table[c]; ok {
			return false
		}
	}
	return true
}

// Unchanged implements exstore.OptimisticLookuper.
func (s *modelStore) Unchanged(token uint64) bool { return token == 7 }

func (s *modelStore) Prepare(_ context.Context, old exstore.Chunk) (exstore.Exception, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.prepareLocked(old)
}

// PrepareIfUnchanged implements exstore.ConditionalPreparer. The
// condUnlocked mutant checks the word before it takes mu, so that it can
// allocate after a change of the word and a count that missed it.
func (s *modelStore) PrepareIfUnchanged(_ context.Context, old exstore.Chunk, word *atomic.Uint64, want uint64) (exstore.Exception, error) {
	changed := fmt.Errorf("model %s: %w", s.dev.Name(), exstore.ErrChanged)
	if s.mutant == "condUnlocked" {
		if word.Load() != want {
			return exstore.Exception{}, changed
		}
		runtime.Gosched()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.mutant != "condUnlocked" && word.Load() != want {
		return exstore.Exception{}, changed
	}
	return s.prepareLocked(old)
}

// Unsettled implements exstore.ConditionalPreparer: the queued exceptions
// not aborted (a Commit's stays queued until written). The settleAtCommit
// mutant stops counting one when its Commit is called.
func (s *modelStore) Unsettled() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, p := range s.queue {
		if !p.aborted && (p.done == nil || s.mutant != "settleAtCommit") {
			n++
		}
	}
	return n
}

// prepareLocked is Prepare. Callers hold mu.
func (s *modelStore) prepareLocked(old exstore.Chunk) (exstore.Exception, error) {
	if s.invalid != nil {
		return exstore.Exception{}, s.invalid
	}
	if s.mutant == "reuseAborted" && len(s.freed) > 0 {
		e := exstore.Exception{Old: old, New: s.freed[0]}
		s.freed = s.freed[1:]
		s.queue = append(s.queue, &modelPending{e: e})
		return e, nil
	}
	n := int64(s.nextFree)
	if n+1 > s.chunks {
		return exstore.Exception{}, fmt.Errorf("model %s: %w", s.dev.Name(), exstore.ErrNoSpace)
	}
	// The last data chunk of an area fills it; the next area must fit.
	if n%(s.perArea+1) == 0 && n+1 >= s.chunks && s.mutant != "fillLastArea" {
		return exstore.Exception{}, fmt.Errorf("model %s: %w", s.dev.Name(), exstore.ErrNoSpace)
	}
	e := exstore.Exception{Old: old, New: s.nextFree}
	s.nextFree++
	if s.isArea(s.nextFree) && s.mutant != "metadataChunk" {
		s.nextFree++
	}
	if s.mutant == "lookupBeforeCommit" {
		s.table[old] = e.New
	}
	s.queue = append(s.queue, &modelPending{e: e})
	return e, nil
}

// pending finds the queued record of e. Callers hold mu.
func (s *modelStore) pending(e exstore.Exception) *modelPending {
	for _, p := range s.queue {
		if p.e == e {
			return p
		}
	}
	return nil
}

func (s *modelStore) Commit(ctx context.Context, e exstore.Exception) error {
	s.mu.Lock()
	if s.invalid != nil {
		s.mu.Unlock()
		return s.invalid
	}
	p := s.pending(e)
	if p == nil || p.done != nil || (p.aborted && s.mutant != "commitAborted") {
		s.mu.Unlock()
		return fmt.Errorf("model %s: %v: %w", s.dev.Name(), e, exstore.ErrNotPrepared)
	}
	done := make(chan error, 1)
	p.done = done
	if s.mutant == "commitNoWait" {
		s.queue = slices.DeleteFunc(s.queue, func(q *modelPending) bool { return q == p })
		p.done <- s.writeLocked(p.e)
	}
	s.completeLocked()
	s.mu.Unlock()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// writeLocked appends a record to the disk and the table. Callers hold mu.
func (s *modelStore) writeLocked(e exstore.Exception) error {
	if _, dup := s.table[e.Old]; dup {
		return fmt.Errorf("model %s: second exception for chunk %d", s.dev.Name(), e.Old)
	}
	s.disk.mu.Lock()
	s.disk.records = append(s.disk.records, e)
	s.disk.mu.Unlock()
	s.table[e.Old] = e.New
	return nil
}

// completeLocked completes queued exceptions in Prepare order. Callers hold
// mu.
func (s *modelStore) completeLocked() {
	for len(s.queue) > 0 {
		p := s.queue[0]
		switch {
		case p.aborted:
		case p.done != nil:
			p.done <- s.writeLocked(p.e)
		default:
			return
		}
		s.queue = s.queue[1:]
	}
}

func (s *modelStore) Abort(e exstore.Exception) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.pending(e)
	if p == nil || p.done != nil || p.aborted {
		return false
	}
	p.aborted = true
	s.freed = append(s.freed, e.New)
	s.completeLocked()
	return true
}

func (s *modelStore) Usage() exstore.Usage {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.disk.mu.Lock()
	r := int64(len(s.disk.records))
	s.disk.mu.Unlock()
	areas := r/s.perArea + 2
	if s.mutant == "metadataOffByOne" && r > 0 {
		areas++
	}
	return exstore.Usage{
		AllocatedSectors: uint64(s.nextFree) * uint64(s.c),
		TotalSectors:     uint64(s.dev.Size()) / exstore.SectorSize,
		MetadataSectors:  uint64(areas) * uint64(s.c),
		Exceptions:       uint64(len(s.table)),
	}
}

func (s *modelStore) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.invalid
}

func (s *modelStore) Invalidate(_ context.Context, reason error) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.invalid = &exstore.InvalidError{Device: s.dev.Name(), Reason: reason}
	s.disk.mu.Lock()
	s.disk.invalid = true
	s.disk.mu.Unlock()
	for _, p := range s.queue {
		if p.done != nil {
			p.done <- s.invalid
			p.done, p.aborted = nil, true
		}
	}
	return nil
}

func (s *modelStore) PrepareMerge(context.Context) (exstore.Exception, int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.disk.mu.Lock()
	defer s.disk.mu.Unlock()
	r := len(s.disk.records)
	if r == 0 {
		return exstore.Exception{}, 0, nil
	}
	last := s.disk.records[r-1]
	areaStart := (r - 1) / int(s.perArea) * int(s.perArea)
	if s.mutant == "mergeOldOnly" {
		areaStart = 0
	}
	n := 1
	for i := r - 2; i >= areaStart; i-- {
		back := exstore.Chunk(n)
		if s.disk.records[i].Old != last.Old-back {
			break
		}
		if s.disk.records[i].New != last.New-back && s.mutant != "mergeOldOnly" {
			break
		}
		n++
	}
	s.merging = n
	return last, n, nil
}

func (s *modelStore) CommitMerge(_ context.Context, n int) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if n <= 0 || n > s.merging {
		return fmt.Errorf("model %s: merge of %d after PrepareMerge returned %d: %w", s.dev.Name(), n, s.merging, exstore.ErrMerge)
	}
	s.merging = 0
	s.disk.mu.Lock()
	defer s.disk.mu.Unlock()
	r := len(s.disk.records) - n
	for _, e := range s.disk.records[r:] {
		delete(s.table, e.Old)
	}
	s.disk.records = s.disk.records[:r]
	s.nextFree = s.areaLocation(int64(r)/s.perArea) + exstore.Chunk(int64(r)%s.perArea) + 1
	return nil
}

func (s *modelStore) Refresh(context.Context) error {
	if s.mutant == "refreshNoop" {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.disk.mu.Lock()
	defer s.disk.mu.Unlock()
	s.loadLocked()
	return nil
}

func (s *modelStore) Walk(fn func(exstore.Exception) bool) {
	s.mu.Lock()
	table := maps.Clone(s.table)
	s.mu.Unlock()
	for old, n := range table {
		if !fn(exstore.Exception{Old: old, New: n}) && s.mutant != "walkNoStop" {
			return
		}
	}
}

func (s *modelStore) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return errors.New("model: closed twice")
	}
	s.closed = true
	return nil
}

// modelHarness is the suite's harness for the model store, with the
// persistent store's formulas.
func modelHarness(mutant string) Harness {
	var mu sync.Mutex
	disks := make(map[blockdev.Device]*modelDisk)
	diskOf := func(dev blockdev.Device) *modelDisk {
		mu.Lock()
		defer mu.Unlock()
		return disks[dev]
	}
	perArea := func(c uint32) uint64 { return uint64(c) * exstore.SectorSize / 16 }
	wait := time.Duration(0)
	if mutant != "" {
		wait = 2 * time.Second // the model answers in microseconds; mutants may never
	}
	return Harness{
		Name:      "model",
		WaitLimit: wait,
		New: func(t *testing.T, c uint32, cowBytes int64) (exstore.Store, blockdev.Device) {
			dev := faultdev.New(t.Name(), cowBytes)
			t.Cleanup(func() { assert.NoError(t, dev.Close()) })
			disk := &modelDisk{c: c}
			mu.Lock()
			disks[dev] = disk
			mu.Unlock()
			return openModel(disk, dev, c, mutant), dev
		},
		Reopen: func(t *testing.T, s exstore.Store, dev blockdev.Device) exstore.Store {
			require.NoError(t, s.Close())
			disk := diskOf(dev)
			return openModel(disk, dev, disk.c, mutant)
		},
		OpenShared: func(t *testing.T, dev blockdev.Device) exstore.Store {
			disk := diskOf(dev)
			return openModel(disk, dev, disk.c, mutant)
		},
		Capacity: func(c uint32, cowBytes int64) uint64 {
			n := uint64(cowBytes) / (uint64(c) * exstore.SectorSize)
			if n < 2 {
				return 0
			}
			e := perArea(c)
			capacity := n - 2 - (n-2)/(e+1)
			if n%(e+1) == 1 {
				capacity--
			}
			return capacity
		},
		IsMetadata: func(c uint32, ch exstore.Chunk) bool {
			return ch == 0 || (uint64(ch)-1)%(perArea(c)+1) == 0
		},
		WantUsage: func(c uint32, cowBytes int64, n uint64) exstore.Usage {
			e := perArea(c)
			return exstore.Usage{
				AllocatedSectors: (2 + n + n/e) * uint64(c),
				TotalSectors:     uint64(cowBytes) / exstore.SectorSize,
				MetadataSectors:  (n/e + 2) * uint64(c),
				Exceptions:       n,
			}
		},
		Span:  perArea,
		Merge: true,
	}
}

// TestModel runs the suite against the correct model: every sub-test must
// pass, reload, merge and refresh included.
func TestModel(t *testing.T) { Run(t, modelHarness("")) }

// mutantEnv names, in a child test process, the mutant TestMutant runs.
const mutantEnv = "STORETEST_MUTANT"

// TestMutant runs the suite against the mutant named by mutantEnv. It is a
// child of TestSuiteCatchesMutants, which expects it to fail.
func TestMutant(t *testing.T) {
	mutant := os.Getenv(mutantEnv)
	if mutant == "" {
		t.Skip("run by TestSuiteCatchesMutants")
	}
	Run(t, modelHarness(mutant))
}

// TestSuiteCatchesMutants checks that each sub-test can fail: it runs the
// suite against models with one deliberate bug each, in a child process so
// that the expected failure does not fail this test, and checks that the
// sub-test meant to catch that bug failed.
func TestSuiteCatchesMutants(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the suite in child processes")
	}
	for _, m := range []struct {
		mutant  string
		subtest string // the sub-test of Run that must fail
	}{
		{"fillLastArea", "allocation"},
		{"metadataChunk", "allocation"},
		{"reuseAborted", "order"},
		{"reuseAborted", "in-order commit/abort"},
		{"lookupBeforeCommit", "lookup"},
		{"rangeOffByOne", "lookup"},
		{"commitAborted", "in-order commit/not prepared"},
		{"optimisticOffByOne", "lookup"},
		{"absenceShort", "lookup"},
		{"walkNoStop", "walk"},
		{"commitNoWait", "in-order commit/cancelled"},
		{"lostOnReopen", "reload"},
		{"metadataOffByOne", "usage"},
		{"invalidNotDurable", "invalidate"},
		{"mergeOldOnly", "merge/units"},
		{"refreshNoop", "refresh"},
		{"condUnlocked", "conditional prepare"},
		{"settleAtCommit", "conditional prepare"},
	} {
		t.Run(m.mutant+"/"+m.subtest, func(t *testing.T) {
			name := strings.ReplaceAll(m.subtest, " ", "_")
			pattern := "^TestMutant$"
			for elem := range strings.SplitSeq(name, "/") {
				pattern += "/^" + regexp.QuoteMeta(elem) + "$"
			}
			cmd := exec.CommandContext(t.Context(), os.Args[0], "-test.run="+pattern, "-test.v", "-test.timeout=2m")
			cmd.Env = append(os.Environ(), mutantEnv+"="+m.mutant)
			out, err := cmd.CombinedOutput()
			var exit *exec.ExitError
			require.ErrorAs(t, err, &exit, "the suite passed the %s mutant:\n%s", m.mutant, out)
			assert.Contains(t, string(out), "--- FAIL: TestMutant/"+name+" ", "output:\n%s", out)
		})
	}
}
