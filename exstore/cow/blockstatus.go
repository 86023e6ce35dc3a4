package cow

import (
	"context"
	"fmt"
	"slices"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
)

// Extent is a byte range of a snapshot and where its data lives.
type Extent struct {
	Offset, Length int64
	// InCOW reports that the range's chunks have exceptions: the data is on
	// the COW device (it differs, or may differ, from the origin's).
	InCOW bool
}

// extentsLookupEvery is how many per-chunk lookups Extents does between
// checks of its context.
const extentsLookupEvery = 1024

// Extents describes [off, off+length) of the snapshot as maximal runs of
// COW-backed and origin-backed ranges, in order, covering the range
// exactly (the last chunk of an origin whose size is not a multiple of the
// chunk size is clipped). It costs the smaller of one lookup per chunk of
// the range and one walk over the store's exceptions.
//
// Exceptions are only ever added while the snapshot is served, so an
// answer given during origin or snapshot writes may report as
// origin-backed a chunk that is being copied; the data is the same either
// way. An invalid snapshot has no trustworthy data: its error wraps
// exstore.ErrInvalid.
func (s *Snapshot) Extents(ctx context.Context, off, length int64) ([]Extent, error) {
	if off < 0 || length < 0 || off > s.size || length > s.size-off {
		return nil, fmt.Errorf("snapshot %s: extents of %d bytes at %d (volume size %d): %w", s.name, length, off, s.size, blockdev.ErrOutOfRange)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := s.failure(); err != nil {
		return nil, fmt.Errorf("snapshot %s: extents: %w", s.name, err)
	}
	if length == 0 {
		return nil, nil
	}
	first := exstore.Chunk(off / s.chunkBytes)
	last := exstore.Chunk((off + length - 1) / s.chunkBytes)
	cowChunks, err := s.cowChunksIn(ctx, first, last)
	if err != nil {
		return nil, fmt.Errorf("snapshot %s: extents of %d bytes at %d: %w", s.name, length, off, err)
	}

	end := off + length
	var out []Extent
	add := func(from, to int64, inCOW bool) {
		if to <= from {
			return
		}
		if n := len(out); n > 0 && out[n-1].InCOW == inCOW && out[n-1].Offset+out[n-1].Length == from {
			out[n-1].Length += to - from
			return
		}
		out = append(out, Extent{Offset: from, Length: to - from, InCOW: inCOW})
	}
	pos := off
	for _, c := range cowChunks {
		from := max(int64(c)*s.chunkBytes, off)
		to := min(int64(c+1)*s.chunkBytes, end)
		add(pos, from, false)
		add(from, to, true)
		pos = to
	}
	add(pos, end, false)
	return out, nil
}

// cowChunksIn returns, sorted, the chunks in [first, last] that have an
// exception: by looking each chunk up, or by walking the store's
// exceptions when it has fewer than the range has chunks.
func (s *Snapshot) cowChunksIn(ctx context.Context, first, last exstore.Chunk) ([]exstore.Chunk, error) {
	var out []exstore.Chunk
	if uint64(last-first) >= s.store.Usage().Exceptions {
		s.store.Walk(func(e exstore.Exception) bool {
			if e.Old >= first && e.Old <= last {
				out = append(out, e.Old)
			}
			return true
		})
		slices.Sort(out)
		return slices.Compact(out), ctx.Err()
	}
	for c := first; c <= last; c++ {
		if (c-first)%extentsLookupEvery == 0 {
			if err := ctx.Err(); err != nil {
				return nil, err
			}
		}
		_, found, err := s.lookup(ctx, c)
		if err != nil {
			return nil, err
		}
		if found {
			out = append(out, c)
		}
	}
	return out, nil
}
