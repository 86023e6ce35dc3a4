package faultdev

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"math/rand/v2"
	"slices"
	"sync"

	"github.com/clustersnap/clustersnap/exstore/blockdev"
)

// SectorSize is the granularity at which the model keeps, loses and tears
// writes.
const SectorSize = 512

// ErrPowerCut is the error of every operation on a device after a power cut
// has replaced it, so goroutines still using it cannot leak writes into the
// image that survived.
var ErrPowerCut = errors.New("device lost power")

// Op names an operation for fault injection.
type Op int

// The operations a fault function is asked about. WriteAtSync is two: a
// Write, asked before its data enters the cache, then a FUA, asked before
// its sectors are made durable, with the same range.
const (
	Read Op = iota
	Write
	Sync
	Discard
	FUA
)

// String returns the operation's name.
func (op Op) String() string {
	switch op {
	case Read:
		return "read"
	case Write:
		return "write"
	case Sync:
		return "sync"
	case Discard:
		return "discard"
	case FUA:
		return "fua"
	}
	return fmt.Sprintf("Op(%d)", int(op))
}

// FaultFunc decides whether an operation fails: a non-nil error fails it.
// For Sync, off is 0 and length the device size.
type FaultFunc func(op Op, off, length int64) error

// Stats counts the operations a device has carried out; operations that
// failed count nowhere.
type Stats struct {
	Reads        uint64 // ReadAt calls
	Writes       uint64 // WriteAt calls
	Syncs        uint64 // Sync calls
	WriteSyncs   uint64 // WriteAtSync calls (not counted in Writes)
	Discards     uint64 // Discard calls
	BytesRead    uint64 // bytes returned by ReadAt
	BytesWritten uint64 // bytes written by WriteAt and WriteAtSync
}

// Device is the in-memory device. Its methods are safe for concurrent use.
type Device struct {
	name string
	size int64

	mu sync.Mutex
	// current is the newest content, what reads return.
	current []byte
	// durable is the content that survives any power cut.
	durable []byte
	// pending maps each sector written since it was last made durable to
	// the sector's versions since then, oldest first; the last one equals
	// the sector in current.
	pending map[int64][][]byte
	fault   FaultFunc
	stats   Stats
	closed  bool
	dead    bool
}

var (
	_ blockdev.Device    = (*Device)(nil)
	_ blockdev.Discarder = (*Device)(nil)
)

// New returns a zero-filled device of size bytes. It panics on a negative
// size.
func New(name string, size int64) *Device {
	if size < 0 {
		panic(fmt.Sprintf("faultdev %s: negative size %d", name, size))
	}
	return fromImage(name, make([]byte, size))
}

// FromBytes returns a device whose durable content is a copy of b.
func FromBytes(name string, b []byte) *Device {
	return fromImage(name, bytes.Clone(b))
}

// fromImage returns a device that takes ownership of image as its durable
// content.
func fromImage(name string, image []byte) *Device {
	if image == nil {
		image = []byte{}
	}
	return &Device{
		name:    name,
		size:    int64(len(image)),
		current: bytes.Clone(image),
		durable: image,
		pending: make(map[int64][][]byte),
	}
}

// Name returns the name given at creation.
func (d *Device) Name() string { return d.name }

// Size returns the device size in bytes.
func (d *Device) Size() int64 { return d.size }

// Alignment returns 1: any offset and length work, though the cache model
// keeps and loses whole sectors.
func (d *Device) Alignment() int { return 1 }

// SetFault installs f, consulted before every operation; nil removes it. f is
// called without the device's lock held, so it may block (to hold an
// operation in flight while a test cuts power) or call the device.
func (d *Device) SetFault(f FaultFunc) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.fault = f
}

// Stats returns the operation counters.
func (d *Device) Stats() Stats {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.stats
}

// ResetStats sets the operation counters to zero.
func (d *Device) ResetStats() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.stats = Stats{}
}

// Bytes returns a copy of the newest content, what reads return.
func (d *Device) Bytes() []byte {
	d.mu.Lock()
	defer d.mu.Unlock()
	return bytes.Clone(d.current)
}

// DurableBytes returns a copy of the content that survives any power cut.
func (d *Device) DurableBytes() []byte {
	d.mu.Lock()
	defer d.mu.Unlock()
	return bytes.Clone(d.durable)
}

// ReadAt reads the newest content at off, returning io.EOF when the device
// ends before p is full.
func (d *Device) ReadAt(p []byte, off int64) (int, error) {
	if err := d.begin(Read, off, int64(len(p))); err != nil {
		return 0, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.usableLocked(Read, off); err != nil {
		return 0, err
	}
	n := 0
	if off < d.size {
		n = copy(p, d.current[off:])
	}
	d.stats.Reads++
	d.stats.BytesRead += uint64(n)
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// WriteAt writes p at off into the volatile cache.
func (d *Device) WriteAt(p []byte, off int64) (int, error) {
	if err := d.begin(Write, off, int64(len(p))); err != nil {
		return 0, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.usableLocked(Write, off); err != nil {
		return 0, err
	}
	copy(d.current[off:], p)
	d.recordVersionsLocked(off, int64(len(p)))
	d.stats.Writes++
	d.stats.BytesWritten += uint64(len(p))
	return len(p), nil
}

// WriteAtSync writes p at off and makes the sectors it touches durable with
// their newest content (for a partial sector, that includes earlier unsynced
// writes to the rest of it). Other pending sectors stay pending. It works in
// two steps, each asked of the fault function: the Write puts p in the
// volatile cache as a pending version of each sector, the FUA makes those
// sectors durable. A FUA that fails, or a power cut while the fault function
// holds it, leaves p pending, so a cut may keep any subset of its sectors:
// only each sector is atomic.
func (d *Device) WriteAtSync(p []byte, off int64) (int, error) {
	if err := d.begin(Write, off, int64(len(p))); err != nil {
		return 0, err
	}
	if err := d.cacheWrite(p, off); err != nil {
		return 0, err
	}
	if err := d.begin(FUA, off, int64(len(p))); err != nil {
		return 0, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.usableLocked(FUA, off); err != nil {
		return 0, err
	}
	if len(p) > 0 {
		first, last := sectorSpan(off, int64(len(p)))
		for s := first; s <= last; s++ {
			start, end := d.sectorBounds(s)
			copy(d.durable[start:end], d.current[start:end])
			delete(d.pending, s)
		}
	}
	d.stats.WriteSyncs++
	d.stats.BytesWritten += uint64(len(p))
	return len(p), nil
}

// cacheWrite puts p at off in the volatile cache, as a pending version of
// each sector it touches.
func (d *Device) cacheWrite(p []byte, off int64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.usableLocked(Write, off); err != nil {
		return err
	}
	copy(d.current[off:], p)
	d.recordVersionsLocked(off, int64(len(p)))
	return nil
}

// Sync makes every pending sector durable with its newest content.
func (d *Device) Sync() error {
	if err := d.begin(Sync, 0, d.size); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.usableLocked(Sync, 0); err != nil {
		return err
	}
	for s := range d.pending {
		start, end := d.sectorBounds(s)
		copy(d.durable[start:end], d.current[start:end])
	}
	clear(d.pending)
	d.stats.Syncs++
	return nil
}

// Discard zeroes [off, off+length), as a pending write of zeroes.
func (d *Device) Discard(off, length int64) error {
	if err := d.begin(Discard, off, length); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.usableLocked(Discard, off); err != nil {
		return err
	}
	clear(d.current[off : off+length])
	d.recordVersionsLocked(off, length)
	d.stats.Discards++
	return nil
}

// Close marks the device closed; later operations fail with fs.ErrClosed. A
// closed device can still lose power: PowerCut works on it as on an open one.
func (d *Device) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.dead {
		return fmt.Errorf("faultdev %s: close: %w", d.name, ErrPowerCut)
	}
	if d.closed {
		return fmt.Errorf("faultdev %s: close: %w", d.name, fs.ErrClosed)
	}
	d.closed = true
	return nil
}

// PowerCut cuts the power: it returns a new device, with the same name and
// size, in which every pending sector holds, chosen independently with rng,
// its durable content or any one of its pending versions. All of the new
// device's content is durable. d is dead from then on: every operation on it
// fails with ErrPowerCut. Its content stays frozen, so cutting it again gives
// another possible outcome of the same cut. Pending sectors are visited in
// sector order, so a seeded rng reproduces an outcome.
func (d *Device) PowerCut(rng *rand.Rand) *Device {
	return d.cut(func(versions [][]byte) []byte {
		choice := rng.IntN(len(versions) + 1)
		if choice == len(versions) {
			return nil
		}
		return versions[choice]
	})
}

// PowerCutDropAll cuts the power like PowerCut, with only durable content
// surviving: every pending write is lost.
func (d *Device) PowerCutDropAll() *Device {
	return d.cut(func([][]byte) []byte { return nil })
}

// PowerCutKeepAll cuts the power like PowerCut, with every pending write
// surviving: the new device holds the newest content.
func (d *Device) PowerCutKeepAll() *Device {
	return d.cut(func(versions [][]byte) []byte { return versions[len(versions)-1] })
}

// cut kills d and returns the device that survives it, in which each pending
// sector holds the version choose picks (nil for its durable content).
func (d *Device) cut(choose func(versions [][]byte) []byte) *Device {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.dead = true
	image := bytes.Clone(d.durable)
	for _, s := range slices.Sorted(maps.Keys(d.pending)) {
		if version := choose(d.pending[s]); version != nil {
			start, _ := d.sectorBounds(s)
			copy(image[start:], version)
		}
	}
	return fromImage(d.name, image)
}

// begin checks that the device is usable and that [off, off+length) is a
// valid range for op (inside the device for changes), then asks the fault
// function, if any, about the operation. It returns with the lock released:
// the caller locks again and rechecks usability, since a power cut may have
// happened while the fault function ran.
func (d *Device) begin(op Op, off, length int64) error {
	d.mu.Lock()
	err := d.usableLocked(op, off)
	fault := d.fault
	d.mu.Unlock()
	if err != nil {
		return err
	}
	switch {
	case op == Read && off < 0:
		return fmt.Errorf("faultdev %s: read at offset %d: negative offset", d.name, off)
	case (op == Write || op == FUA || op == Discard) && (off < 0 || length < 0 || off > d.size-length):
		return fmt.Errorf("faultdev %s: %s at offset %d length %d (device size %d): %w",
			d.name, op, off, length, d.size, blockdev.ErrOutOfRange)
	}
	if fault == nil {
		return nil
	}
	if err := fault(op, off, length); err != nil {
		return fmt.Errorf("faultdev %s: %s at offset %d length %d: %w", d.name, op, off, length, err)
	}
	return nil
}

// usableLocked fails once the device is closed or has lost power.
func (d *Device) usableLocked(op Op, off int64) error {
	if d.dead {
		return fmt.Errorf("faultdev %s: %s at offset %d: %w", d.name, op, off, ErrPowerCut)
	}
	if d.closed {
		return fmt.Errorf("faultdev %s: %s at offset %d: %w", d.name, op, off, fs.ErrClosed)
	}
	return nil
}

// recordVersionsLocked appends the newest content of every sector that
// [off, off+length) touches to the sector's pending versions.
func (d *Device) recordVersionsLocked(off, length int64) {
	if length == 0 {
		return
	}
	first, last := sectorSpan(off, length)
	for s := first; s <= last; s++ {
		start, end := d.sectorBounds(s)
		d.pending[s] = append(d.pending[s], bytes.Clone(d.current[start:end]))
	}
}

// sectorBounds returns the byte range of sector s; the last sector of a
// device whose size is not a multiple of SectorSize is short.
func (d *Device) sectorBounds(s int64) (start, end int64) {
	start = s * SectorSize
	return start, min(start+SectorSize, d.size)
}

// sectorSpan returns the first and last sectors of a non-empty byte range.
func sectorSpan(off, length int64) (first, last int64) {
	return off / SectorSize, (off + length - 1) / SectorSize
}
