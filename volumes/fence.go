package volumes

import (
	"errors"
	"fmt"
	"sync/atomic"

	"github.com/clustersnap/clustersnap/exstore/blockdev"
)

// ErrClusterLost is wrapped by the I/O a cluster member refuses after it
// lost its lockspace.
var ErrClusterLost = errors.New("I/O to shared storage stopped: this node lost its cluster lockspace")

// lossFence stops every I/O to a shared device once the node has lost its
// lockspace: the node can no longer be sure of its locks, so its reads may
// be stale and its writes may land on data another node now owns. Each
// clustered store sets the flag from its lockspace's loss notification, so
// it is set before the lock engine lets another node have the locks (where
// the engine promises that; see lockc.LostNotifier).
type lossFence struct {
	blockdev.Device
	cluster string
	lost    *atomic.Bool
}

// discardingLossFence is a lossFence over a device that can discard.
type discardingLossFence struct{ *lossFence }

// fenceShared wraps d so that its I/O stops once lost is set.
func fenceShared(d blockdev.Device, cluster string, lost *atomic.Bool) blockdev.Device {
	f := &lossFence{Device: d, cluster: cluster, lost: lost}
	if _, ok := d.(blockdev.Discarder); ok {
		return discardingLossFence{f}
	}
	return f
}

func (f *lossFence) check() error {
	if f.lost.Load() {
		return fmt.Errorf("cluster %s: %s: %w", f.cluster, f.Device.Name(), ErrClusterLost)
	}
	return nil
}

// ReadAt implements blockdev.Device.
func (f *lossFence) ReadAt(p []byte, off int64) (int, error) {
	if err := f.check(); err != nil {
		return 0, err
	}
	return f.Device.ReadAt(p, off)
}

// WriteAt implements blockdev.Device.
func (f *lossFence) WriteAt(p []byte, off int64) (int, error) {
	if err := f.check(); err != nil {
		return 0, err
	}
	return f.Device.WriteAt(p, off)
}

// WriteAtSync implements blockdev.Device.
func (f *lossFence) WriteAtSync(p []byte, off int64) (int, error) {
	if err := f.check(); err != nil {
		return 0, err
	}
	return f.Device.WriteAtSync(p, off)
}

// Sync implements blockdev.Device.
func (f *lossFence) Sync() error {
	if err := f.check(); err != nil {
		return err
	}
	return f.Device.Sync()
}

// Close does not close the device: the Set closes it.
func (f *lossFence) Close() error { return nil }

// Discard implements blockdev.Discarder.
func (f discardingLossFence) Discard(off, length int64) error {
	if err := f.check(); err != nil {
		return err
	}
	return f.Device.(blockdev.Discarder).Discard(off, length)
}
