package persistent

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"unicode/utf8"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
)

// The label record (format.md, "Label"): clustersnap's own record in the
// header chunk, after the kernel's HeaderSize bytes, which the kernel
// neither reads nor writes except when it formats a new store (it then
// writes the whole chunk from a zeroed buffer: the COW is unlabelled).
const (
	// LabelOffset is where the record starts in chunk 0.
	LabelOffset = HeaderSize
	// LabelSize is the record's length in bytes, checksum included; it
	// ends well inside the first sector, the smallest chunk.
	LabelSize = 360
	// LabelMagic starts the record; on disk its bytes read "CSLB".
	LabelMagic uint32 = 0x424C5343
	// LabelVersion is the only record version this code reads. The merge
	// state sits in bytes that version 1 first reserved as zero; a reader
	// that knows them only as reserved refuses any other value, so it
	// refuses a merging or merged COW rather than serve it as a snapshot.
	LabelVersion uint16 = 1
	// MaxLabelClusterID and MaxLabelOriginID bound the strings, in bytes.
	MaxLabelClusterID = 64
	MaxLabelOriginID  = 256
)

// Offsets inside the record (relative to LabelOffset).
const (
	lblMagic      = 0
	lblVersion    = 4
	lblMerge      = 6
	lblUUID       = 8
	lblOriginSize = 24
	lblClusterLen = 32
	lblOriginLen  = 34
	lblCluster    = 36
	lblOrigin     = lblCluster + MaxLabelClusterID // 100
	lblCRC        = lblOrigin + MaxLabelOriginID   // 356
)

// ErrBadLabel is wrapped by every refusal of a label record.
var ErrBadLabel = errors.New("bad COW label")

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// EncodeLabel writes l as a record into b[:LabelSize], refusing what the
// record cannot hold.
func EncodeLabel(b []byte, l exstore.Label) error {
	switch {
	case len(b) < LabelSize:
		return fmt.Errorf("%w: buffer of %d bytes is shorter than a label (%d)", ErrBadLabel, len(b), LabelSize)
	case l.UUID.IsZero():
		return fmt.Errorf("%w: the UUID is zero", ErrBadLabel)
	case len(l.ClusterID) > MaxLabelClusterID:
		return fmt.Errorf("%w: cluster id of %d bytes is longer than %d", ErrBadLabel, len(l.ClusterID), MaxLabelClusterID)
	case len(l.Origin.ID) > MaxLabelOriginID:
		return fmt.Errorf("%w: origin id of %d bytes is longer than %d", ErrBadLabel, len(l.Origin.ID), MaxLabelOriginID)
	case !utf8.ValidString(l.ClusterID) || !utf8.ValidString(l.Origin.ID):
		return fmt.Errorf("%w: cluster id %q or origin id %q is not UTF-8", ErrBadLabel, l.ClusterID, l.Origin.ID)
	case l.Origin.Size < 0:
		return fmt.Errorf("%w: origin size %d is negative", ErrBadLabel, l.Origin.Size)
	case l.Merge > exstore.Merged:
		return fmt.Errorf("%w: %v is not a merge state", ErrBadLabel, l.Merge)
	case l.Merge != exstore.NotMerging && l.Origin.IsZero():
		return fmt.Errorf("%w: a %v COW must name its origin", ErrBadLabel, l.Merge)
	}
	r := b[:LabelSize]
	clear(r)
	le := binary.LittleEndian
	le.PutUint32(r[lblMagic:], LabelMagic)
	le.PutUint16(r[lblVersion:], LabelVersion)
	le.PutUint16(r[lblMerge:], uint16(l.Merge))
	copy(r[lblUUID:], l.UUID[:])
	le.PutUint64(r[lblOriginSize:], uint64(l.Origin.Size))
	le.PutUint16(r[lblClusterLen:], uint16(len(l.ClusterID)))
	le.PutUint16(r[lblOriginLen:], uint16(len(l.Origin.ID)))
	copy(r[lblCluster:], l.ClusterID)
	copy(r[lblOrigin:], l.Origin.ID)
	le.PutUint32(r[lblCRC:], crc32.Checksum(r[:lblCRC], castagnoli))
	return nil
}

// DecodeLabel reads the record in b[:LabelSize]: ok is false when those
// bytes are all zero (no label). Anything else that is not a record this
// code wrote is refused with the reason: foreign bytes, an unknown
// version, a bad checksum, fields out of bounds or not in canonical form.
func DecodeLabel(b []byte) (l exstore.Label, ok bool, err error) {
	if len(b) < LabelSize {
		return exstore.Label{}, false, fmt.Errorf("%w: %d bytes are shorter than a label (%d)", ErrBadLabel, len(b), LabelSize)
	}
	r := b[:LabelSize]
	if isZero(r) {
		return exstore.Label{}, false, nil
	}
	le := binary.LittleEndian
	if m := le.Uint32(r[lblMagic:]); m != LabelMagic {
		return exstore.Label{}, false, fmt.Errorf("%w: bytes %d..%d of the header chunk are not zero and not a clustersnap label (magic % x, want \"CSLB\")",
			ErrBadLabel, LabelOffset, LabelOffset+LabelSize-1, r[lblMagic:lblMagic+4])
	}
	if v := le.Uint16(r[lblVersion:]); v != LabelVersion {
		return exstore.Label{}, false, fmt.Errorf("%w: label version %d is not supported (only %d)", ErrBadLabel, v, LabelVersion)
	}
	if got, want := le.Uint32(r[lblCRC:]), crc32.Checksum(r[:lblCRC], castagnoli); got != want {
		return exstore.Label{}, false, fmt.Errorf("%w: checksum %08x, computed %08x: the label is damaged", ErrBadLabel, got, want)
	}
	cl, ol := int(le.Uint16(r[lblClusterLen:])), int(le.Uint16(r[lblOriginLen:]))
	size := le.Uint64(r[lblOriginSize:])
	switch {
	case le.Uint16(r[lblMerge:]) > uint16(exstore.Merged):
		return exstore.Label{}, false, fmt.Errorf("%w: merge state %d is unknown (0 none, 1 merging, 2 merged)", ErrBadLabel, le.Uint16(r[lblMerge:]))
	case cl > MaxLabelClusterID:
		return exstore.Label{}, false, fmt.Errorf("%w: cluster id length %d is more than %d", ErrBadLabel, cl, MaxLabelClusterID)
	case ol > MaxLabelOriginID:
		return exstore.Label{}, false, fmt.Errorf("%w: origin id length %d is more than %d", ErrBadLabel, ol, MaxLabelOriginID)
	case !isZero(r[lblCluster+cl : lblOrigin]), !isZero(r[lblOrigin+ol : lblCRC]):
		return exstore.Label{}, false, fmt.Errorf("%w: bytes after the cluster id or origin id are not zero", ErrBadLabel)
	case size > 1<<63-1:
		return exstore.Label{}, false, fmt.Errorf("%w: origin size %d does not fit in 63 bits", ErrBadLabel, size)
	}
	copy(l.UUID[:], r[lblUUID:])
	l.ClusterID = string(r[lblCluster : lblCluster+cl])
	l.Origin = exstore.OriginIdentity{Size: int64(size), ID: string(r[lblOrigin : lblOrigin+ol])}
	l.Merge = exstore.MergeState(le.Uint16(r[lblMerge:]))
	switch {
	case l.UUID.IsZero():
		return exstore.Label{}, false, fmt.Errorf("%w: the UUID is zero", ErrBadLabel)
	case l.Merge != exstore.NotMerging && l.Origin.IsZero():
		return exstore.Label{}, false, fmt.Errorf("%w: a %v COW names no origin", ErrBadLabel, l.Merge)
	case !utf8.ValidString(l.ClusterID) || !utf8.ValidString(l.Origin.ID):
		return exstore.Label{}, false, fmt.Errorf("%w: cluster id %q or origin id %q is not UTF-8", ErrBadLabel, l.ClusterID, l.Origin.ID)
	}
	return l, true, nil
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// ReadLabel reads the label of the COW on dev, as Store.Label does,
// without opening the store; the header must be a valid dm-snapshot
// header.
func ReadLabel(ctx context.Context, dev blockdev.Device) (exstore.Label, bool, error) {
	if err := ctx.Err(); err != nil {
		return exstore.Label{}, false, err
	}
	align := max(exstore.SectorSize, dev.Alignment())
	b := blockdev.AlignedBuffer(align, align)
	if _, err := dev.ReadAt(b, 0); err != nil {
		return exstore.Label{}, false, fmt.Errorf("cow %s: read header: %w", dev.Name(), err)
	}
	if err := DecodeHeader(b).Check(); err != nil {
		return exstore.Label{}, false, fmt.Errorf("cow %s: %w", dev.Name(), err)
	}
	l, ok, err := DecodeLabel(b[LabelOffset:])
	if err != nil {
		return exstore.Label{}, false, fmt.Errorf("cow %s: %w", dev.Name(), err)
	}
	return l, ok, nil
}

// Label implements exstore.Labeler: the label as it is on the device now
// (another node may have written it since the store was opened).
func (s *Store) Label(ctx context.Context) (exstore.Label, bool, error) {
	if err := ctx.Err(); err != nil {
		return exstore.Label{}, false, err
	}
	s.metaMu.Lock()
	defer s.metaMu.Unlock()
	b, err := s.readAt(0, s.align)
	if err != nil {
		return exstore.Label{}, false, s.errf("read header: %w", err)
	}
	l, ok, err := DecodeLabel(b[LabelOffset:])
	if err != nil {
		return exstore.Label{}, false, s.errf("%w", err)
	}
	return l, ok, nil
}

// SetLabel implements exstore.Labeler. A device writes whole sectors, so
// the label's sector is read, the record replaced in it, and the sector
// written back with FUA: the kernel's header fields (bytes 0..15) are
// written with the values just read, under metaMu (which this store's own
// header writes take too), and no other chunk is written. It refuses a
// header that is no longer this store's (another chunk size, or not a
// dm-snapshot header at all).
func (s *Store) SetLabel(ctx context.Context, l exstore.Label) error {
	rec := make([]byte, LabelSize)
	if err := EncodeLabel(rec, l); err != nil {
		return s.errf("%w", err)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	s.metaMu.Lock()
	defer s.metaMu.Unlock()
	b, err := s.readAt(0, s.align)
	if err != nil {
		return s.errf("read header: %w", err)
	}
	h := DecodeHeader(b)
	if err := h.Check(); err != nil {
		return s.errf("label not written: %w", err)
	}
	if h.ChunkSectors != s.geo.ChunkSectors {
		return s.errf("label not written: %w: chunk size changed from %d to %d sectors", ErrCorrupt, s.geo.ChunkSectors, h.ChunkSectors)
	}
	if bytes.Equal(b[LabelOffset:LabelOffset+LabelSize], rec) {
		return nil
	}
	copy(b[LabelOffset:], rec)
	if _, err := s.dev.WriteAtSync(b, 0); err != nil {
		return s.errf("write label: %w", err)
	}
	return nil
}
