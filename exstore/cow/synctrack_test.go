package cow

import (
	"sync"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestSyncTrackerCoversCompletedWrites races writers against flushers
// through a syncTracker over a model device: a write completes by taking
// the next sequence number, and a sync makes durable every write that
// completed before it began. Every flush must return with every write
// whose wrote() returned before the flush began durable, while most
// flushes of an idle device and most writes between flushes skip their
// work. A round catches a tracker that lets a write go uncounted wrongly
// about half the time; ten rounds nearly always.
func TestSyncTrackerCoversCompletedWrites(t *testing.T) {
	for range 10 {
		syncTrackerRound(t)
	}
}

// syncTrackerRound is one round of TestSyncTrackerCoversCompletedWrites.
func syncTrackerRound(t *testing.T) {
	var tracker syncTracker
	// Write i (from 1) is the i-th to complete; writes up to durable are
	// durable; maxAcked is the last write whose wrote() returned.
	var completed, durable, maxAcked atomic.Uint64
	var syncs atomic.Int64
	syncDev := func() error {
		syncs.Add(1)
		storeMax(&durable, completed.Load())
		return nil
	}
	const writers, flushers, writes = 4, 3, 20000
	var wg sync.WaitGroup
	done := make(chan struct{})
	for range writers {
		wg.Go(func() {
			for range writes {
				i := completed.Add(1)
				tracker.wrote()
				storeMax(&maxAcked, i)
			}
		})
	}
	failures := make(chan string, flushers)
	var flushWG sync.WaitGroup
	for range flushers {
		flushWG.Go(func() {
			for {
				select {
				case <-done:
					return
				default:
				}
				acked := maxAcked.Load()
				require.NoError(t, tracker.syncWith(syncDev))
				if durable.Load() < acked {
					failures <- "a flush returned with acknowledged writes not durable"
					return
				}
			}
		})
	}
	wg.Wait()
	close(done)
	flushWG.Wait()
	close(failures)
	for f := range failures {
		assert.Fail(t, f)
	}
	// Once idle, a flush syncs once more at most, then never.
	require.NoError(t, tracker.syncWith(syncDev))
	before := syncs.Load()
	require.NoError(t, tracker.syncWith(syncDev))
	assert.Equal(t, before, syncs.Load(), "a flush of a clean device synced")
	assert.Equal(t, uint64(writers*writes), durable.Load())
	assert.Less(t, tracker.written.Load(), uint64(writers*writes), "every write moved the count")
}
