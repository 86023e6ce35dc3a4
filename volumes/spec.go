package volumes

import (
	"fmt"
	"math/bits"
	"strings"

	"github.com/dustin/go-humanize"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/cow"
	"github.com/clustersnap/clustersnap/exstore/transient"
	"github.com/clustersnap/clustersnap/persistent"
)

// OriginExport is the export name of the origin volume; no snapshot takes
// it.
const OriginExport = "origin"

// SnapshotSyntax is the form ParseSnapshotSpec reads.
const SnapshotSyntax = "NAME=COW[,ro][,overflow][,type=P|N][,chunk=SIZE]"

// SnapshotSpec is a snapshot to serve: its export name, its COW device and
// how its store is opened.
type SnapshotSpec struct {
	// Name is the snapshot's export name.
	Name string
	// COW is the path of the COW file or block device.
	COW string
	// Type is the store type, a registry name or alias as the kernel's
	// table gives it: "P" (persistent, the default) or "N" (transient).
	Type string
	// ChunkSectors is the chunk size in sectors: required by a transient
	// store, which has no header to read it from; for a persistent store,
	// zero or its header's.
	ChunkSectors uint32
	// Options are the engine's snapshot options.
	Options cow.SnapshotOptions
}

// storeType is the spec's store type, the persistent one when none is
// named.
func (s SnapshotSpec) storeType() string {
	if s.Type == "" {
		return persistent.TypeName
	}
	return s.Type
}

// ParseSnapshotSpec reads NAME=COW[,ro][,overflow][,type=P|N][,chunk=SIZE]:
// ro and overflow as the kernel's snapshot options, type the store type
// (default P), chunk its chunk size (a power of two from 512 bytes, such as
// 4KiB), which a transient store needs.
func ParseSnapshotSpec(v string) (SnapshotSpec, error) {
	name, rest, ok := strings.Cut(v, "=")
	if !ok || name == "" || rest == "" {
		return SnapshotSpec{}, fmt.Errorf("%q: want %s", v, SnapshotSyntax)
	}
	if name == OriginExport {
		return SnapshotSpec{}, fmt.Errorf("%q: the name %q is the origin's export", v, OriginExport)
	}
	parts := strings.Split(rest, ",")
	spec := SnapshotSpec{Name: name, COW: parts[0]}
	if spec.COW == "" {
		return SnapshotSpec{}, fmt.Errorf("%q: want %s", v, SnapshotSyntax)
	}
	for _, o := range parts[1:] {
		key, val, _ := strings.Cut(o, "=")
		switch key {
		case "ro":
			spec.Options.ReadOnly = true
		case "overflow":
			spec.Options.Overflow = true
		case "type":
			t, ok := newRegistry().Lookup(val)
			if !ok {
				return SnapshotSpec{}, fmt.Errorf("%q: unknown store type %q (known: %s)", v, val, knownTypes())
			}
			spec.Type = t.Name
		case "chunk":
			cs, err := ParseChunkSize(val)
			if err != nil {
				return SnapshotSpec{}, fmt.Errorf("%q: %w", v, err)
			}
			spec.ChunkSectors = cs
		default:
			return SnapshotSpec{}, fmt.Errorf("%q: unknown snapshot option %q (ro, overflow, type=, chunk=)", v, o)
		}
	}
	if spec.Type == transient.TypeName && spec.ChunkSectors == 0 {
		return SnapshotSpec{}, fmt.Errorf("%q: a transient store needs its chunk size (chunk=4KiB, say)", v)
	}
	return spec, nil
}

// ParseChunkSize reads a chunk size such as "4KiB", "8k" or "512" and
// returns it in sectors, applying the kernel's rules: a power of two from
// 512 bytes to 1 GiB.
func ParseChunkSize(s string) (uint32, error) {
	n, err := humanize.ParseBytes(s)
	if err != nil {
		return 0, fmt.Errorf("chunk size %q: %w", s, err)
	}
	if n < exstore.SectorSize || n%exstore.SectorSize != 0 || bits.OnesCount64(n) != 1 || n/exstore.SectorSize > uint64(persistent.MaxChunkSectors) {
		return 0, fmt.Errorf("chunk size %s: must be a power of two from 512 B to 1 GiB", s)
	}
	return uint32(n / exstore.SectorSize), nil
}
