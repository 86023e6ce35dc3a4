package volumes

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"

	"github.com/dustin/go-humanize"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/persistent"
)

// MinCOWChunks is the smallest COW LVM accepts: header, one metadata
// area, one data chunk.
const MinCOWChunks = 3

// ErrCOWHoldsData is wrapped by FormatCOW's refusal of a COW whose first
// chunks are not all zero, without Force.
var ErrCOWHoldsData = errors.New("already holds data (a snapshot or something else)")

// ErrNoCOW is wrapped by FormatCOW's refusal of a COW that does not
// exist, without CreateBytes.
var ErrNoCOW = errors.New("the COW does not exist; give its size to create it as a file")

// FormatSpec is a COW to format for a snapshot of an origin.
type FormatSpec struct {
	// Origin is the origin's path: the COW must not be the origin.
	Origin string
	// COW is the path of the COW file or block device.
	COW string
	// ChunkSectors is the chunk size in sectors (ParseChunkSize).
	ChunkSectors uint32
	// CreateBytes, if not zero, creates the COW as a sparse file of this
	// size first; an existing file is then refused.
	CreateBytes int64
	// Force formats a COW that holds data.
	Force bool
}

// Formatted describes a COW FormatCOW formatted.
type Formatted struct {
	UUID        exstore.UUID
	COWBytes    int64
	OriginBytes int64
	ChunkBytes  int64
	// Capacity is how many exceptions the COW has room for.
	Capacity uint64
	Usage    exstore.Usage
}

// String describes the result for people.
func (f Formatted) String() string {
	return fmt.Sprintf("%s COW %s for an origin of %s, %s chunks, room for %s exceptions",
		humanize.IBytes(uint64(f.COWBytes)), f.UUID, humanize.IBytes(uint64(f.OriginBytes)),
		humanize.IBytes(uint64(f.ChunkBytes)), humanize.Comma(int64(f.Capacity)))
}

// FormatCOW checks a COW for a snapshot of an origin and formats it as an
// empty persistent store, labelled with a new UUID and no cluster (the
// first clustered Open stamps one). It writes nothing unless every check
// passes: the COW is not the origin, holds at least MinCOWChunks chunks,
// and its first two chunks are zero unless Force. The COW is opened with
// an exclusive host-local lock while it is formatted, the origin read-only
// and without one (a running server holds it). A file it created is
// removed again if the format fails.
func FormatCOW(ctx context.Context, spec FormatSpec) (Formatted, error) {
	if spec.CreateBytes > 0 {
		if err := blockdev.Create(spec.COW, spec.CreateBytes); err != nil {
			return Formatted{}, fmt.Errorf("cow %s: %w", spec.COW, err)
		}
	}
	f, err := formatCOW(ctx, spec)
	if err != nil && spec.CreateBytes > 0 {
		_ = os.Remove(spec.COW)
	}
	return f, err
}

func formatCOW(ctx context.Context, spec FormatSpec) (Formatted, error) {
	oi, err := os.Stat(spec.Origin)
	if err != nil {
		return Formatted{}, fmt.Errorf("origin: %w", err)
	}
	ci, err := os.Stat(spec.COW)
	if errors.Is(err, fs.ErrNotExist) {
		return Formatted{}, fmt.Errorf("cow %s: %w", spec.COW, ErrNoCOW)
	}
	if err != nil {
		return Formatted{}, fmt.Errorf("cow: %w", err)
	}
	if os.SameFile(oi, ci) {
		return Formatted{}, fmt.Errorf("cow %s: is the origin itself; a snapshot needs its own COW device", spec.COW)
	}
	o, err := blockdev.Open(spec.Origin, blockdev.Options{ReadOnly: true})
	if err != nil {
		return Formatted{}, fmt.Errorf("origin: %w", err)
	}
	defer o.Close()
	dev, err := blockdev.Open(spec.COW, blockdev.Options{Exclusive: true})
	if err != nil {
		return Formatted{}, fmt.Errorf("cow: %w", err)
	}
	defer dev.Close()
	cb := int64(spec.ChunkSectors) * exstore.SectorSize
	if cb == 0 {
		return Formatted{}, fmt.Errorf("cow %s: no chunk size", spec.COW)
	}
	if dev.Size() < MinCOWChunks*cb {
		return Formatted{}, fmt.Errorf("cow %s: %s holds fewer than %d chunks of %s (header, metadata, data)",
			spec.COW, humanize.IBytes(uint64(dev.Size())), MinCOWChunks, humanize.IBytes(uint64(cb)))
	}
	if !spec.Force {
		used, err := holdsData(dev, 2*cb)
		if err != nil {
			return Formatted{}, err
		}
		if used {
			return Formatted{}, fmt.Errorf("cow %s: %w; force the format to overwrite it", spec.COW, ErrCOWHoldsData)
		}
	}
	id, err := exstore.NewUUID()
	if err != nil {
		return Formatted{}, err
	}
	s, err := persistent.Format(ctx, dev, spec.ChunkSectors, nil)
	if err != nil {
		return Formatted{}, fmt.Errorf("cow %s: %w", spec.COW, err)
	}
	defer s.Close()
	if err := s.SetLabel(ctx, exstore.Label{UUID: id}); err != nil {
		return Formatted{}, fmt.Errorf("cow %s: %w", spec.COW, err)
	}
	return Formatted{
		UUID: id, COWBytes: dev.Size(), OriginBytes: o.Size(), ChunkBytes: cb,
		Capacity: s.Geometry().Capacity(), Usage: s.Usage(),
	}, nil
}

// holdsData reports whether the first n bytes of dev are not all zero.
func holdsData(dev blockdev.Device, n int64) (bool, error) {
	buf := blockdev.AlignedBuffer(int(min(n, 1<<20)), max(dev.Alignment(), 1))
	for off := int64(0); off < n; off += int64(len(buf)) {
		if _, err := dev.ReadAt(buf, off); err != nil {
			return false, fmt.Errorf("cow %s: read: %w", dev.Name(), err)
		}
		if !bytes.Equal(buf, make([]byte, len(buf))) {
			return true, nil
		}
	}
	return false, nil
}
