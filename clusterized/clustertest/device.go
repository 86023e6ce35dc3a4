package clustertest

import (
	"errors"
	"fmt"
	"runtime"
	"sync"

	"github.com/clustersnap/clustersnap/exstore/blockdev"
)

// errNodeDown is the error of every I/O of a node after its power went.
var errNodeDown = errors.New("node is down")

// nodeDevice is one node's path to a shared device. Fencing it stands for
// the node's power going: it waits for the node's I/O in flight and fails
// every later one, as a dead node does no more I/O (the DLM recovers locks
// only after fencing, so a crash test fences first, then Crash).
type nodeDevice struct {
	blockdev.Device
	mu   sync.RWMutex
	dead bool
}

func (d *nodeDevice) begin() error {
	d.mu.RLock()
	if d.dead {
		d.mu.RUnlock()
		return fmt.Errorf("%s: %w", d.Device.Name(), errNodeDown)
	}
	return nil
}

func (d *nodeDevice) ReadAt(p []byte, off int64) (int, error) {
	if err := d.begin(); err != nil {
		return 0, err
	}
	defer d.mu.RUnlock()
	// Let other goroutines run between a lookup and the read it decided
	// on: that widens the windows the test is after.
	runtime.Gosched()
	return d.Device.ReadAt(p, off)
}

func (d *nodeDevice) WriteAt(p []byte, off int64) (int, error) {
	if err := d.begin(); err != nil {
		return 0, err
	}
	defer d.mu.RUnlock()
	return d.Device.WriteAt(p, off)
}

func (d *nodeDevice) WriteAtSync(p []byte, off int64) (int, error) {
	if err := d.begin(); err != nil {
		return 0, err
	}
	defer d.mu.RUnlock()
	return d.Device.WriteAtSync(p, off)
}

func (d *nodeDevice) Sync() error {
	if err := d.begin(); err != nil {
		return err
	}
	defer d.mu.RUnlock()
	return d.Device.Sync()
}

func (d *nodeDevice) Close() error { return nil }

func (d *nodeDevice) fence() {
	d.mu.Lock()
	d.dead = true
	d.mu.Unlock()
}
