package persistent

import (
	"context"
	"fmt"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
)

// maxProblems bounds the problems a check lists; it still counts them all.
const maxProblems = 1000

// Problem is one thing wrong with a COW's metadata, and where.
type Problem struct {
	Area   uint64            `json:"area"`
	Slot   uint64            `json:"slot"`
	Record exstore.Exception `json:"record"`
	What   string            `json:"what"`
}

func (p Problem) String() string {
	return fmt.Sprintf("area %d slot %d: %v: %s", p.Area, p.Slot, p.Record, p.What)
}

// CheckReport is the result of Check.
type CheckReport struct {
	Header     Header    `json:"header"`
	Exceptions uint64    `json:"exceptions"`
	Areas      uint64    `json:"areas"`    // metadata areas read
	Problems   []Problem `json:"problems"` // the first maxProblems errors
	Errors     uint64    `json:"errors"`   // all errors, listed or not
	Warnings   []Problem `json:"warnings"` // stale records after the terminator (first maxProblems)
	// Label is the COW's label, nil when it has none or LabelError says
	// why it cannot be used.
	Label      *exstore.Label `json:"label,omitempty"`
	LabelError string         `json:"label_error,omitempty"`
}

// OK reports whether the metadata has no errors (warnings allowed) and
// the label, if any, is sound.
func (r *CheckReport) OK() bool { return r.Errors == 0 && r.LabelError == "" }

func (r *CheckReport) problem(p Problem) {
	r.Errors++
	if len(r.Problems) < maxProblems {
		r.Problems = append(r.Problems, p)
	}
}

// Check verifies the metadata of the COW on dev without changing it: every
// record points inside the device and not at the header or an area, no
// origin chunk and no COW chunk is used twice, a terminator ends the list
// (a full last area has a successor), and nothing but zeroes follows it;
// and it reads the label, reporting one that cannot be used.
// Unlike Open it does not stop at the first error. progress, if not nil, is
// called with the number of areas read so far and the number the device
// can hold. The error is for what stops the check itself: I/O, or a header
// that is not a valid dm-snapshot header.
func Check(ctx context.Context, dev blockdev.Device, progress func(done, max uint64)) (*CheckReport, error) {
	align := max(exstore.SectorSize, dev.Alignment())
	hb := blockdev.AlignedBuffer(align, align)
	if _, err := dev.ReadAt(hb, 0); err != nil {
		return nil, fmt.Errorf("cow %s: read header: %w", dev.Name(), err)
	}
	r := &CheckReport{Header: DecodeHeader(hb)}
	if r.Header.Magic == 0 {
		return nil, fmt.Errorf("cow %s: %w", dev.Name(), ErrNotFormatted)
	}
	if err := r.Header.Check(); err != nil {
		return nil, fmt.Errorf("cow %s: %w", dev.Name(), err)
	}
	if l, ok, err := DecodeLabel(hb[LabelOffset:]); err != nil {
		r.LabelError = err.Error()
	} else if ok {
		r.Label = &l
	}
	g := NewGeometry(r.Header.ChunkSectors, dev.Size())
	if g.Chunks < 2 {
		return nil, fmt.Errorf("cow %s: device holds fewer than two chunks", dev.Name())
	}
	maxAreas := (g.Chunks-1)/(g.PerArea+1) + 1
	usedNew := make([]uint64, (g.Chunks+63)/64)
	seenOld := make(map[exstore.Chunk][2]uint64)
	perRead := uint64(min(g.ChunkBytes, readChunk) / RecordSize)
	buf := blockdev.AlignedBuffer(int(perRead*RecordSize), align)

	for area := uint64(0); ; area++ {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		if uint64(g.AreaLocation(area)) >= g.Chunks {
			r.problem(Problem{Area: area - 1, Slot: g.PerArea - 1,
				What: fmt.Sprintf("no terminator: area %d is full and its successor (chunk %d) lies past the end of the device", area-1, g.AreaLocation(area))})
			return r, nil
		}
		r.Areas++
		terminated := false
		base := int64(g.AreaLocation(area)) * g.ChunkBytes
		for from := uint64(0); from < g.PerArea; from += perRead {
			n := min(perRead, g.PerArea-from)
			b := buf[:n*RecordSize]
			if _, err := dev.ReadAt(b, base+int64(from*RecordSize)); err != nil {
				return nil, fmt.Errorf("cow %s: read metadata area %d: %w", dev.Name(), area, err)
			}
			for i := uint64(0); i < n; i++ {
				rec, slot := DecodeRecord(b, int(i)), from+i
				if terminated {
					if rec.Old != 0 || rec.New != 0 {
						r.Warnings = appendBounded(r.Warnings, Problem{Area: area, Slot: slot, Record: rec,
							What: "stale record after the terminator (a kernel appending to this area could revive it)"})
					}
					continue
				}
				if rec.New == 0 {
					terminated = true
					continue
				}
				r.Exceptions++
				checkRecord(r, g, usedNew, seenOld, area, slot, rec)
			}
		}
		if progress != nil {
			progress(r.Areas, maxAreas)
		}
		if terminated {
			return r, nil
		}
	}
}

func checkRecord(r *CheckReport, g Geometry, usedNew []uint64, seenOld map[exstore.Chunk][2]uint64, area, slot uint64, rec exstore.Exception) {
	p := Problem{Area: area, Slot: slot, Record: rec}
	switch {
	case uint64(rec.New) >= g.Chunks:
		p.What = fmt.Sprintf("COW chunk %d is past the end of the device (%d chunks)", rec.New, g.Chunks)
		r.problem(p)
	case g.IsMetadata(rec.New):
		p.What = fmt.Sprintf("COW chunk %d is the header or a metadata area", rec.New)
		r.problem(p)
	default:
		w, bit := rec.New/64, uint64(1)<<(rec.New%64)
		if usedNew[w]&bit != 0 {
			p.What = fmt.Sprintf("COW chunk %d is used by an earlier record too", rec.New)
			r.problem(p)
		}
		usedNew[w] |= bit
	}
	if rec.Old > exstore.MaxChunk {
		p.What = fmt.Sprintf("origin chunk %d is beyond the 2^56 limit", rec.Old)
		r.problem(p)
	}
	if at, dup := seenOld[rec.Old]; dup {
		p.What = fmt.Sprintf("origin chunk %d already has an exception (area %d slot %d)", rec.Old, at[0], at[1])
		r.problem(p)
	} else {
		seenOld[rec.Old] = [2]uint64{area, slot}
	}
}

func appendBounded(ps []Problem, p Problem) []Problem {
	if len(ps) < maxProblems {
		ps = append(ps, p)
	}
	return ps
}
