package clusterized

import (
	"errors"
	"fmt"
	"sync/atomic"

	"github.com/clustersnap/clustersnap/exstore/blockdev"
)

// ErrFenced is wrapped by the writes a fenced device refuses.
var ErrFenced = errors.New("write refused: this node lost its cluster lock")

// fencedDevice passes I/O to Device, except writes once the lockspace is
// lost. It is the store's last line against writing shared metadata without
// the lock; the window between the loss and a write already past the check
// is what real fencing (the DLM waits for the dead node to be fenced)
// closes.
type fencedDevice struct {
	blockdev.Device
	cluster string
	lost    atomic.Pointer[<-chan struct{}]
}

// check fails once the lockspace is lost.
func (d *fencedDevice) check() error {
	p := d.lost.Load()
	if p == nil {
		return nil
	}
	select {
	case <-*p:
		return fmt.Errorf("cluster %s: cow %s: %w", d.cluster, d.Device.Name(), ErrFenced)
	default:
		return nil
	}
}

// WriteAt implements blockdev.Device.
func (d *fencedDevice) WriteAt(p []byte, off int64) (int, error) {
	if err := d.check(); err != nil {
		return 0, err
	}
	return d.Device.WriteAt(p, off)
}

// WriteAtSync implements blockdev.Device.
func (d *fencedDevice) WriteAtSync(p []byte, off int64) (int, error) {
	if err := d.check(); err != nil {
		return 0, err
	}
	return d.Device.WriteAtSync(p, off)
}

// Close does not close the underlying device: the store does not own it.
func (d *fencedDevice) Close() error { return nil }
