package volumes

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/clustersnap/clustersnap/exstore/cow"
	"github.com/clustersnap/clustersnap/nbd"
)

// ErrNoSuchExport is wrapped by Exports' refusal of a default export that
// names none of the set's.
var ErrNoSuchExport = errors.New("no such export")

// Exports lists the NBD exports: the origin, then one per snapshot but
// the one merging into the origin, and defaultExport again under the empty
// name if it is not empty. Every export offers multi-conn (see the package
// comment).
func (v *Set) Exports(defaultExport string) ([]nbd.Export, error) {
	ex := []nbd.Export{v.originExport()}
	for _, s := range v.Snapshots() {
		if !mergeBusy(s) {
			ex = append(ex, v.snapshotExport(s))
		}
	}
	if defaultExport == "" {
		return ex, nil
	}
	for _, e := range ex {
		if e.Name == defaultExport {
			return append(ex, asDefault(e)), nil
		}
	}
	return nil, fmt.Errorf("default export %q: %w", defaultExport, ErrNoSuchExport)
}

// Exporter serves NBD exports that come and go: nbd.Server is one.
type Exporter interface {
	// AddExport serves e from now on.
	AddExport(e nbd.Export) error
	// RemoveExport stops serving the export name, and returns once the
	// connections that used it have closed.
	RemoveExport(ctx context.Context, name string) error
}

var _ Exporter = (*nbd.Server)(nil)

// Export tells the Set where its exports are served (the exports of
// Exports(defaultExport), which the caller serves already), so that
// snapshots created live are served there at once and deleted ones stop
// being served before they are taken out of the origin.
func (v *Set) Export(x Exporter, defaultExport string) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.exporter, v.defaultExport = x, defaultExport
}

// originExport is the origin's export.
func (v *Set) originExport() nbd.Export {
	return nbd.Export{Name: OriginExport, Description: "origin " + v.Origin.Device().Name(), Backend: originBackend{v.Origin}, MultiConn: true}
}

// snapshotExport is snapshot s's export.
func (v *Set) snapshotExport(s *cow.Snapshot) nbd.Export {
	desc := fmt.Sprintf("snapshot of %s in %s", v.Origin.Device().Name(), s.COW().Name())
	return nbd.Export{Name: s.Name(), Description: desc, Backend: snapshotBackend{s}, ReadOnly: s.Options().ReadOnly, MultiConn: true}
}

// asDefault is e served under the empty name.
func asDefault(e nbd.Export) nbd.Export {
	e.Name, e.Description = "", e.Description+" (default export)"
	return e
}

// snapshotBackend serves a snapshot, adding the changed-block map: which
// ranges live in the COW (the clustersnap:exceptions meta context).
type snapshotBackend struct{ *cow.Snapshot }

var (
	_ nbd.Backend        = snapshotBackend{}
	_ nbd.Trimmer        = snapshotBackend{}
	_ nbd.Zeroer         = snapshotBackend{}
	_ nbd.COWMapper      = snapshotBackend{}
	_ nbd.DirtyBitmapper = snapshotBackend{}
)

// COWExtents implements nbd.COWMapper.
func (b snapshotBackend) COWExtents(ctx context.Context, off, length int64) ([]nbd.COWExtent, error) {
	ext, err := b.Extents(ctx, off, length)
	if err != nil {
		return nil, err
	}
	out := make([]nbd.COWExtent, len(ext))
	for i, e := range ext {
		out[i] = nbd.COWExtent{Length: e.Length, InCOW: e.InCOW}
	}
	return out, nil
}

// DirtyBitmaps implements nbd.DirtyBitmapper: a bitmap per snapshot of the
// origin, named after it.
func (b snapshotBackend) DirtyBitmaps() []string { return dirtyBitmaps(b.Origin()) }

// DirtyExtents implements nbd.DirtyBitmapper. The bitmap of snapshot since
// marks where this snapshot may differ from since as it was taken: where
// either has exceptions (elsewhere both read the origin). For since itself
// that is its own exceptions.
func (b snapshotBackend) DirtyExtents(ctx context.Context, bitmap string, off, length int64) ([]nbd.DirtyExtent, error) {
	since, err := snapshotNamed(b.Origin(), bitmap)
	if err != nil {
		return nil, err
	}
	sinceExt, err := since.Extents(ctx, off, length)
	if err != nil {
		return nil, err
	}
	if since == b.Snapshot {
		return dirtyUnion(sinceExt, nil), nil
	}
	own, err := b.Extents(ctx, off, length)
	if err != nil {
		return nil, err
	}
	return dirtyUnion(sinceExt, own), nil
}

// WriteZeroes implements nbd.Zeroer. Zeroing a snapshot allocates and
// writes like any write, so it is never the fast kind.
func (b snapshotBackend) WriteZeroes(ctx context.Context, off, length int64, o nbd.ZeroOptions) error {
	if o.Fast {
		return nbd.ErrZeroNotFast
	}
	return b.Snapshot.WriteZeroes(ctx, off, length, o.NoHole, o.FUA)
}

// originBackend serves the origin; Trim comes from cow.Origin as it is.
type originBackend struct{ *cow.Origin }

var (
	_ nbd.Backend        = originBackend{}
	_ nbd.Trimmer        = originBackend{}
	_ nbd.Zeroer         = originBackend{}
	_ nbd.DirtyBitmapper = originBackend{}
)

// WriteZeroes implements nbd.Zeroer. The snapshots' copies cost as much as
// writes, so a request that must be fast is refused.
func (b originBackend) WriteZeroes(ctx context.Context, off, length int64, o nbd.ZeroOptions) error {
	if o.Fast {
		return nbd.ErrZeroNotFast
	}
	return b.Origin.WriteZeroes(ctx, off, length, o.NoHole, o.FUA)
}

// DirtyBitmaps implements nbd.DirtyBitmapper: a bitmap per snapshot,
// named after it.
func (b originBackend) DirtyBitmaps() []string { return dirtyBitmaps(b.Origin) }

// DirtyExtents implements nbd.DirtyBitmapper. The origin differs from a
// snapshot exactly where the snapshot has exceptions, except in merge
// mode, where it reads the merging snapshot's view: no bitmap is offered
// then.
func (b originBackend) DirtyExtents(ctx context.Context, bitmap string, off, length int64) ([]nbd.DirtyExtent, error) {
	if m, _, ok := b.Origin.Merging(); ok {
		return nil, fmt.Errorf("bitmap %s: the origin merges snapshot %s: %w", bitmap, m.Name(), cow.ErrMergeInProgress)
	}
	since, err := snapshotNamed(b.Origin, bitmap)
	if err != nil {
		return nil, err
	}
	ext, err := since.Extents(ctx, off, length)
	if err != nil {
		return nil, err
	}
	return dirtyUnion(ext, nil), nil
}

// dirtyBitmaps names the dirty bitmaps of o's volumes: its snapshots' names,
// sorted.
func dirtyBitmaps(o *cow.Origin) []string {
	var names []string
	for _, s := range o.Snapshots() {
		names = append(names, s.Name())
	}
	slices.Sort(names)
	return names
}

// snapshotNamed returns o's snapshot called name, which a dirty bitmap of
// that name tracks changes since.
func snapshotNamed(o *cow.Origin, name string) (*cow.Snapshot, error) {
	for _, s := range o.Snapshots() {
		if s.Name() == name {
			return s, nil
		}
	}
	return nil, fmt.Errorf("origin %s: snapshot %s: %w", o.Device().Name(), name, nbd.ErrNoSuchBitmap)
}

// dirtyUnion merges two extent lists of the same range into the dirty map
// of their union: dirty where either is in the COW. b may be nil.
func dirtyUnion(a, b []cow.Extent) []nbd.DirtyExtent {
	var out []nbd.DirtyExtent
	add := func(length int64, dirty bool) {
		if n := len(out); n > 0 && out[n-1].Dirty == dirty {
			out[n-1].Length += length
			return
		}
		out = append(out, nbd.DirtyExtent{Length: length, Dirty: dirty})
	}
	if b == nil {
		for _, e := range a {
			add(e.Length, e.InCOW)
		}
		return out
	}
	i, j := 0, 0
	for i < len(a) && j < len(b) {
		ea, eb := a[i], b[j]
		start := max(ea.Offset, eb.Offset)
		end := min(ea.Offset+ea.Length, eb.Offset+eb.Length)
		if end > start {
			add(end-start, ea.InCOW || eb.InCOW)
		}
		if ea.Offset+ea.Length == end {
			i++
		}
		if eb.Offset+eb.Length == end {
			j++
		}
	}
	return out
}
