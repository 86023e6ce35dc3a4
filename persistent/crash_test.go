package persistent_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev/faultdev"
	"github.com/clustersnap/clustersnap/persistent"
)

// errCut is what every device operation returns once the simulated power
// cut has happened.
var errCut = errors.New("power cut")

// pattern is the data an exception for old holds in a crash test.
func pattern(seed uint64, old exstore.Chunk, n int) []byte {
	b := make([]byte, n)
	v := (uint64(old)+1)*0x9E3779B97F4A7C15 ^ seed
	for i := 0; i+8 <= n; i += 8 {
		binary.LittleEndian.PutUint64(b[i:], v+uint64(i))
	}
	return b
}

// TestCrashConsistency cuts power at a random operation on the COW device
// (any read, write, flush, or the FUA step of a durable write, so a cut may
// tear a metadata write at sector granularity) while several writers
// commit, then reloads and checks what must survive.
func TestCrashConsistency(t *testing.T) {
	iterations := 1000
	if testing.Short() {
		iterations = 200
	}
	for it := 0; it < iterations; it++ {
		crashIteration(t, t, uint64(it), crashSetup{})
		if t.Failed() {
			t.Fatalf("iteration %d failed (seed %d)", it, it)
		}
	}
}

// crashSetup varies a crash iteration.
type crashSetup struct {
	// mutant, if set, breaks the stores under test before the cut.
	mutant persistent.FlushMutant
}

// checkData reports, without dumping them, data that differs from want.
func checkData(check assert.TestingT, want, got []byte, format string, args ...any) {
	if !bytes.Equal(want, got) {
		check.Errorf(format+": data differs", args...)
	}
}

// failures collects the findings of a crash checker run against a store
// that is meant to fail it.
type failures struct{ msgs []string }

func (f *failures) Errorf(format string, args ...any) {
	f.msgs = append(f.msgs, fmt.Sprintf(format, args...))
}

// crashIteration runs one crash and its checks. Failures of the harness
// itself go to t; failures of the checked properties go to check.
func crashIteration(t *testing.T, check assert.TestingT, seed uint64, setup crashSetup) {
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(seed, 0xc0ffee))
	chunkSectors := []uint32{1, 2, 8}[rng.IntN(3)]
	cb := int(chunkSectors) * 512
	chunks := 40 + rng.IntN(200)
	// Half the devices are reused: stale bytes everywhere but the first
	// four (a zero magic makes Open format it), as lvcreate leaves them.
	// Areas the store has not zeroed then hold garbage records.
	img := make([]byte, chunks*cb)
	if rng.IntN(2) == 0 {
		for i := 4; i < len(img); i++ {
			img[i] = byte(rng.Uint32())
		}
	}
	dev := faultdev.FromBytes("cow", img)
	s, err := persistent.Open(ctx, dev, persistent.Options{ChunkSectors: chunkSectors, Logger: quietLogger()})
	require.NoError(t, err)
	persistent.SetFlushMutant(s, setup.mutant)

	var (
		mu        sync.Mutex
		completed = map[exstore.Chunk]exstore.Chunk{} // commits that returned success
		prepared  = map[exstore.Chunk]exstore.Chunk{} // everything ever handed out
	)

	// Sometimes start from a loaded store holding earlier exceptions.
	if rng.IntN(3) == 0 {
		n := exstore.Chunk(rng.IntN(50))
		for old := exstore.Chunk(10000); old < 10000+n; old++ {
			e, err := s.Prepare(ctx, old)
			if errors.Is(err, exstore.ErrNoSpace) {
				break
			}
			require.NoError(t, err)
			_, err = dev.WriteAt(pattern(seed, old, cb), int64(e.New)*int64(cb))
			require.NoError(t, err)
			require.NoError(t, s.Commit(ctx, e))
			completed[e.Old] = e.New
		}
		require.NoError(t, s.Close())
		s, err = persistent.Open(ctx, dev, persistent.Options{Logger: quietLogger()})
		require.NoError(t, err)
		persistent.SetFlushMutant(s, setup.mutant)
	}

	// The cut: every operation from the cutAt-th on fails, then the
	// device's volatile state is resolved at random. An operation that
	// fails is one the cut landed in: a durable write whose FUA step
	// fails stays pending, so the cut may keep any of its sectors.
	cutAt := int64(1 + rng.IntN(250))
	var ops atomic.Int64
	dev.SetFault(func(op faultdev.Op, off, length int64) error {
		if ops.Add(1) >= cutAt {
			return errCut
		}
		return nil
	})

	const workers = 4
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int, n int) {
			defer wg.Done()
			for k := 0; k < n; k++ {
				old := exstore.Chunk(w + workers*k)
				e, err := s.Prepare(ctx, old)
				if err != nil {
					return
				}
				mu.Lock()
				prepared[e.Old] = e.New
				mu.Unlock()
				if _, err := dev.WriteAt(pattern(seed, old, cb), int64(e.New)*int64(cb)); err != nil {
					s.Abort(e)
					return
				}
				if err := s.Commit(ctx, e); err != nil {
					return
				}
				mu.Lock()
				completed[e.Old] = e.New
				mu.Unlock()
			}
		}(w, 5+rng.IntN(20))
	}
	wg.Wait()
	require.NoError(t, s.Close())

	var after *faultdev.Device
	switch rng.IntN(4) {
	case 0:
		after = dev.PowerCutDropAll()
	case 1:
		after = dev.PowerCutKeepAll()
	default:
		after = dev.PowerCut(rng)
	}

	// Reload: every exception whose Commit returned, before or during the
	// cut phase, is there with its data, and every record found
	// (acknowledged or not) points at durable data.
	s2, err := persistent.Open(ctx, after, persistent.Options{Logger: quietLogger()})
	if !assert.NoError(check, err, "seed %d: reload after the cut", seed) {
		return
	}
	defer s2.Close()
	found := walk(s2)
	img = after.Bytes()
	for old, nw := range completed {
		if !assert.Equal(check, nw, found[old], "seed %d: acknowledged exception %d lost", seed, old) {
			continue
		}
		checkData(check, pattern(seed, old, cb), img[int(nw)*cb:int(nw+1)*cb], "seed %d: data of acknowledged exception %d→%d", seed, old, nw)
	}
	used := map[exstore.Chunk]bool{}
	g := s2.Geometry()
	for old, nw := range found {
		if old < 10000 {
			assert.Equal(check, prepared[old], nw, "seed %d: record %d→%d was never handed out", seed, old, nw)
		}
		checkData(check, pattern(seed, old, cb), img[int(nw)*cb:int(nw+1)*cb], "seed %d: record %d→%d points at data that was not durable", seed, old, nw)
		assert.False(check, used[nw], "seed %d: chunk %d used twice", seed, nw)
		used[nw] = true
	}

	// No chunk is handed out twice afterwards: fill the store, writing data,
	// and check that the earlier exceptions' data is intact.
	s2valid := s2.Err() == nil
	for old := exstore.Chunk(20000); s2valid; old++ {
		e, err := s2.Prepare(ctx, old)
		if errors.Is(err, exstore.ErrNoSpace) {
			break
		}
		require.NoError(t, err)
		assert.False(check, used[e.New], "seed %d: chunk %d handed out again", seed, e.New)
		assert.False(check, g.IsMetadata(e.New), "seed %d: metadata chunk %d handed out", seed, e.New)
		used[e.New] = true
		_, err = after.WriteAt(pattern(seed, old, cb), int64(e.New)*int64(cb))
		require.NoError(t, err)
		require.NoError(t, s2.Commit(ctx, e))
		found[old] = e.New
	}
	s3, err := persistent.Open(ctx, faultdev.FromBytes("cow", after.DurableBytes()), persistent.Options{Logger: quietLogger()})
	require.NoError(t, err)
	defer s3.Close()
	final := walk(s3)
	assert.Equal(check, len(found), len(final), "seed %d: exceptions after refill and reload", seed)
	img = after.DurableBytes()
	for old, nw := range final {
		require.Equal(t, found[old], nw, "seed %d", seed)
		checkData(check, pattern(seed, old, cb), img[int(nw)*cb:int(nw+1)*cb], "seed %d: data of %d→%d", seed, old, nw)
	}
}

// TestCrashCheckerCatchesMutants proves the crash checker's power: run
// against a store that flushes the data after the metadata write, or never,
// it must fail. The seeds are fixed, from 0 up, and the iterations stop at
// the first one that catches the mutant; each mutant must be caught within
// the budget. The writers' interleaving varies between runs, so which seed
// catches it may vary; the budget is far above what any run has needed.
func TestCrashCheckerCatchesMutants(t *testing.T) {
	const budget = 200 // seeds
	for _, tc := range []struct {
		name   string
		mutant persistent.FlushMutant
	}{
		{"data after metadata", persistent.MutantFlushAfterMetadata},
		{"nothing", persistent.MutantFlushNever},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for seed := uint64(0); seed < budget; seed++ {
				var f failures
				crashIteration(t, &f, seed, crashSetup{mutant: tc.mutant})
				if len(f.msgs) > 0 {
					t.Logf("caught by seed %d: %s", seed, f.msgs[0])
					return
				}
			}
			t.Errorf("the crash checker passed a store that flushes %s in %d seeds", tc.name, budget)
		})
	}
}
