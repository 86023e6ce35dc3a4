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
type syncTracker struct {
	// written counts the writes that completed, counted after each
	// completes.
	written atomic.Uint64
	// synced is the largest written count that a successful sync began
	// after: every write it counts is durable.
	synced atomic.Uint64
}

// wrote records that a write (or discard) to the device completed and is
// not known to be durable.
func (t *syncTracker) wrote() { t.written.Add(1) }

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
	if err := sync(); err != nil {
		return err
	}
	for {
		s := t.synced.Load()
		if s >= w || t.synced.CompareAndSwap(s, w) {
			return nil
		}
	}
}
