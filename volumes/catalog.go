package volumes

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/exstore/cow"
)

// The catalog is the durable list of an origin's snapshots once one was
// created or deleted live: what a restarted server serves, and where the
// nodes of a cluster read the set another node changed (the origin lock's
// value only identifies it). It lives on a small file or device of its
// own (Config.Catalog), shared storage in a cluster, in two slots written
// in turn, so that a torn write loses at most the record being written:
//
//	0–7    magic "CSNAPCAT"
//	8–11   layout version (catalogVersion), little-endian
//	12–15  length of the JSON record that follows
//	16–23  sequence number: one more at every write; the higher valid
//	       slot is the catalog
//	24–27  CRC-32C of bytes 8–23 and the record
//	28–31  zero
//	32–    the record (catalogRecord as JSON)
//
// Slot i starts at i*catalogSlotBytes. Both slots all zero is an empty
// catalog (no record yet).
const (
	catalogMagic     = "CSNAPCAT"
	catalogVersion   = 1
	catalogSlotBytes = 64 << 10
	catalogHeader    = 32
	// CatalogBytes is the size of a catalog: its two slots.
	CatalogBytes = 2 * catalogSlotBytes
)

// ErrBadCatalog is wrapped by every refusal of a catalog's content.
var ErrBadCatalog = errors.New("bad snapshot catalog")

// catalogRecord is one version of the catalog.
type catalogRecord struct {
	// Origin is the origin the catalog belongs to.
	Origin exstore.OriginIdentity `json:"origin"`
	// Snapshots is the origin's whole snapshot set.
	Snapshots []catalogEntry `json:"snapshots"`
}

// catalogEntry is one snapshot of the catalog: a SnapshotSpec, and the UUID
// of its COW's label when it has one.
type catalogEntry struct {
	Name         string `json:"name"`
	COW          string `json:"cow"`
	Type         string `json:"type"`
	ChunkSectors uint32 `json:"chunk_sectors,omitempty"`
	ReadOnly     bool   `json:"read_only,omitempty"`
	Overflow     bool   `json:"overflow,omitempty"`
	UUID         string `json:"cow_uuid,omitempty"`
}

func entryOf(s SnapshotSpec, uuid string) catalogEntry {
	return catalogEntry{Name: s.Name, COW: s.COW, Type: s.storeType(), ChunkSectors: s.ChunkSectors,
		ReadOnly: s.Options.ReadOnly, Overflow: s.Options.Overflow, UUID: uuid}
}

func (e catalogEntry) spec() SnapshotSpec {
	return SnapshotSpec{Name: e.Name, COW: e.COW, Type: e.Type, ChunkSectors: e.ChunkSectors,
		Options: cow.SnapshotOptions{ReadOnly: e.ReadOnly, Overflow: e.Overflow}}
}

// catalog reads and writes the catalog on dev. The caller excludes other
// writers: the Set's changeMu on one node, the origin lock in EX in a
// cluster.
type catalog struct {
	dev  blockdev.Device
	path string
	seq  uint64 // of the record last read or written
}

// openCatalog opens the catalog at path, creating a file of CatalogBytes
// if there is nothing there.
func openCatalog(path string, o blockdev.Options) (*catalog, error) {
	dev, err := blockdev.Open(path, o)
	if errors.Is(err, fs.ErrNotExist) {
		if err := blockdev.Create(path, CatalogBytes); err != nil {
			return nil, fmt.Errorf("catalog %s: %w", path, err)
		}
		dev, err = blockdev.Open(path, o)
	}
	if err != nil {
		return nil, fmt.Errorf("catalog %s: %w", path, err)
	}
	if dev.Size() < CatalogBytes {
		dev.Close()
		return nil, fmt.Errorf("catalog %s: %d bytes, want at least %d", path, dev.Size(), CatalogBytes)
	}
	return &catalog{dev: dev, path: path}, nil
}

func (c *catalog) Close() error { return c.dev.Close() }

// load reads the catalog: ok is false while it holds no record.
func (c *catalog) load() (rec catalogRecord, ok bool, err error) {
	var best []byte
	var bestSeq uint64
	var bad []error
	buf := blockdev.AlignedBuffer(catalogSlotBytes, max(c.dev.Alignment(), 1))
	for slot := range 2 {
		if _, err := c.dev.ReadAt(buf, int64(slot)*catalogSlotBytes); err != nil && !errors.Is(err, io.EOF) {
			return catalogRecord{}, false, fmt.Errorf("catalog %s: read slot %d: %w", c.path, slot, err)
		}
		body, seq, err := decodeCatalogSlot(buf)
		switch {
		case err != nil:
			bad = append(bad, fmt.Errorf("slot %d: %w", slot, err))
		case body != nil && (best == nil || seq > bestSeq):
			best, bestSeq = bytes.Clone(body), seq
		}
	}
	if best == nil {
		if len(bad) > 0 {
			return catalogRecord{}, false, fmt.Errorf("catalog %s: %w", c.path, errors.Join(bad...))
		}
		return catalogRecord{}, false, nil
	}
	if err := json.Unmarshal(best, &rec); err != nil {
		return catalogRecord{}, false, fmt.Errorf("catalog %s: %w: record %d: %v", c.path, ErrBadCatalog, bestSeq, err)
	}
	c.seq = bestSeq
	return rec, true, nil
}

// store writes rec durably as the next record, into the slot the current
// one is not in.
func (c *catalog) store(rec catalogRecord) error {
	body, err := json.Marshal(rec)
	if err != nil {
		return fmt.Errorf("catalog %s: %w", c.path, err)
	}
	if len(body) > catalogSlotBytes-catalogHeader {
		return fmt.Errorf("catalog %s: a record of %d bytes does not fit in a slot of %d", c.path, len(body), catalogSlotBytes-catalogHeader)
	}
	seq := c.seq + 1
	align := max(c.dev.Alignment(), 1)
	n := (catalogHeader + len(body) + align - 1) / align * align
	buf := blockdev.AlignedBuffer(n, align)
	encodeCatalogSlot(buf, body, seq)
	if _, err := c.dev.WriteAt(buf, int64(seq%2)*catalogSlotBytes); err != nil {
		return fmt.Errorf("catalog %s: write: %w", c.path, err)
	}
	if err := c.dev.Sync(); err != nil {
		return fmt.Errorf("catalog %s: sync: %w", c.path, err)
	}
	c.seq = seq
	return nil
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func encodeCatalogSlot(buf, body []byte, seq uint64) {
	le := binary.LittleEndian
	copy(buf, catalogMagic)
	le.PutUint32(buf[8:], catalogVersion)
	le.PutUint32(buf[12:], uint32(len(body)))
	le.PutUint64(buf[16:], seq)
	copy(buf[catalogHeader:], body)
	le.PutUint32(buf[24:], catalogCRC(buf[8:24], body))
}

func catalogCRC(head, body []byte) uint32 {
	return crc32.Update(crc32.Checksum(head, castagnoli), castagnoli, body)
}

// decodeCatalogSlot returns a slot's record and sequence number; a zero
// slot has none (nil body); a slot that is not zero and not a record is an
// error.
func decodeCatalogSlot(b []byte) (body []byte, seq uint64, err error) {
	le := binary.LittleEndian
	if len(b) < catalogHeader {
		return nil, 0, fmt.Errorf("%w: a slot of %d bytes", ErrBadCatalog, len(b))
	}
	if string(b[:8]) != catalogMagic {
		if bytes.Count(b, []byte{0}) == len(b) {
			return nil, 0, nil
		}
		return nil, 0, fmt.Errorf("%w: no catalog magic (another file?)", ErrBadCatalog)
	}
	if v := le.Uint32(b[8:]); v != catalogVersion {
		return nil, 0, fmt.Errorf("%w: layout version %d (this snapd reads %d)", ErrBadCatalog, v, catalogVersion)
	}
	if le.Uint32(b[28:]) != 0 {
		return nil, 0, fmt.Errorf("%w: reserved bytes are not zero (a newer layout?)", ErrBadCatalog)
	}
	n := int(le.Uint32(b[12:]))
	if n > len(b)-catalogHeader {
		return nil, 0, fmt.Errorf("%w: a record of %d bytes overruns its slot", ErrBadCatalog, n)
	}
	body = b[catalogHeader : catalogHeader+n]
	if catalogCRC(b[8:24], body) != le.Uint32(b[24:]) {
		return nil, 0, fmt.Errorf("%w: checksum mismatch (a torn write?)", ErrBadCatalog)
	}
	return body, le.Uint64(b[16:]), nil
}

// checkCatalogOrigin refuses a catalog of another origin.
func checkCatalogOrigin(path string, rec catalogRecord, origin exstore.OriginIdentity) error {
	if rec.Origin.IsZero() || rec.Origin == origin {
		return nil
	}
	if rec.Origin.Size == origin.Size && (rec.Origin.ID == "" || origin.ID == "") {
		return nil
	}
	return fmt.Errorf("catalog %s: %w: it lists the snapshots of %s, not of this %s", path, ErrBadCatalog, rec.Origin, origin)
}
