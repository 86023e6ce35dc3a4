package volumes

import (
	"context"
	"errors"
	"fmt"

	"github.com/clustersnap/clustersnap/exstore/cow"
	"github.com/clustersnap/clustersnap/nbd"
)

// ErrNoSuchExport is wrapped by Exports' refusal of a default export that
// names none of the set's.
var ErrNoSuchExport = errors.New("no such export")

// Exports lists the NBD exports: the origin, then one per snapshot but
// the one merging into the origin (or merged), and defaultExport again
// under the empty name if it is not empty. Every
// export offers multi-conn (see the package comment).
func (v *Set) Exports(defaultExport string) ([]nbd.Export, error) {
	ex := []nbd.Export{{Name: OriginExport, Description: "origin " + v.Origin.Device().Name(), Backend: originBackend{v.Origin}, MultiConn: true}}
	for _, s := range v.Snapshots {
		if mergeBusy(s) {
			continue
		}
		desc := fmt.Sprintf("snapshot of %s in %s", v.Origin.Device().Name(), s.COW().Name())
		ex = append(ex, nbd.Export{Name: s.Name(), Description: desc, Backend: snapshotBackend{s}, ReadOnly: s.Options().ReadOnly, MultiConn: true})
	}
	if defaultExport == "" {
		return ex, nil
	}
	for _, e := range ex {
		if e.Name == defaultExport {
			e.Name, e.Description = "", e.Description+" (default export)"
			return append(ex, e), nil
		}
	}
	return nil, fmt.Errorf("default export %q: %w", defaultExport, ErrNoSuchExport)
}

// snapshotBackend serves a snapshot, adding the changed-block map: which
// ranges live in the COW (the clustersnap:exceptions meta context).
type snapshotBackend struct{ *cow.Snapshot }

var (
	_ nbd.Backend   = snapshotBackend{}
	_ nbd.Trimmer   = snapshotBackend{}
	_ nbd.Zeroer    = snapshotBackend{}
	_ nbd.COWMapper = snapshotBackend{}
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
	_ nbd.Backend = originBackend{}
	_ nbd.Trimmer = originBackend{}
	_ nbd.Zeroer  = originBackend{}
)

// WriteZeroes implements nbd.Zeroer. The snapshots' copies cost as much as
// writes, so a request that must be fast is refused.
func (b originBackend) WriteZeroes(ctx context.Context, off, length int64, o nbd.ZeroOptions) error {
	if o.Fast {
		return nbd.ErrZeroNotFast
	}
	return b.Origin.WriteZeroes(ctx, off, length, o.NoHole, o.FUA)
}
