package cow

import (
	"sync/atomic"

	"github.com/clustersnap/clustersnap/exstore/blockdev"
)

// syncTracker lets a flush skip the sync of a device that no write reached
// since its last sync: a snapshot's flush syncs the origin too, and an
// origin's flush every COW device, and a sync of a clean file still costs
// the filesystem (and often the disk) a cache flush. Its zero value is
// ready to use.
//
// A write counts itself only when a sync has begun since the last count
// (written == started): between flushes, writes only load two words that
// every CPU keeps cached, instead of each doing an atomic add on a line
// they would pass around. A write that does not count is still covered:
// it saw started < written, so no sync had yet published the count it
// saw, and every sync that will has to publish it first, after this
// write completed, and only then sync; a sync that saw a larger count
// began after that count moved, which was after this write completed. So
// synced reaches written only through a sync that began after every write
// that completed before the count was last moved.
type syncTracker struct {
	// written moves (by one) at most once per sync, for the first write
	// that completes after the sync began.
	written atomic.Uint64
	// started is the largest written count that a sync loaded and then
	// began after.
	started atomic.Uint64
	// synced is the largest written count that a successful sync began
	// after: every write it counts is durable.
	synced atomic.Uint64
}

// wrote records that a write (or discard) to the device completed and is
// not known to be durable.
func (t *syncTracker) wrote() {
	if t.written.Load() == t.started.Load() {
		t.written.Add(1)
	}
}

// sync syncs dev unless every write that completed before the call is
// durable already.
func (t *syncTracker) sync(dev blockdev.Device) error { return t.syncWith(dev.Sync) }

// syncWith is sync with a function that makes every write that completed
// before it was called durable.
func (t *syncTracker) syncWith(sync func() error) error {
	w := t.written.Load()
	if w == t.synced.Load() {
		return nil
	}
	storeMax(&t.started, w)
	if err := sync(); err != nil {
		return err
	}
	storeMax(&t.synced, w)
	return nil
}

// storeMax raises v to w unless it is larger already.
func storeMax(v *atomic.Uint64, w uint64) {
	for {
		cur := v.Load()
		if cur >= w || v.CompareAndSwap(cur, w) {
			return
		}
	}
}
