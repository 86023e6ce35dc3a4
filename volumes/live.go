package volumes

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/clustersnap/clustersnap/clusterized/snapset"
	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/exstore/cow"
	"github.com/clustersnap/clustersnap/persistent"
)

// ErrSnapshotExists is wrapped by CreateSnapshot's refusal of a name
// already served.
var ErrSnapshotExists = errors.New("a snapshot of that name is served")

// ErrNoSuchSnapshot is wrapped by DeleteSnapshot's refusal of a name no
// snapshot is served under.
var ErrNoSuchSnapshot = errors.New("no such snapshot")

// ErrDeleted is the reason a deleted snapshot's COW is marked invalid: its
// origin was written without copying into it since.
var ErrDeleted = errors.New("snapshot deleted: it no longer follows its origin")

// MaxSnapshotName bounds a live snapshot's name, in bytes: it names an
// NBD export and, with the cluster id, a lock resource.
const MaxSnapshotName = 64

// DefaultChunkSectors is the chunk size of a live snapshot that names
// none: 4 KiB, as 'snapd create' and lvcreate use.
const DefaultChunkSectors = 8

// CreateRequest is a snapshot to create on a serving origin: a new COW
// formatted as 'snapd create' does (FormatSpec), served under Name.
type CreateRequest struct {
	// Name is the snapshot's export name.
	Name string
	// COW is the path of the COW file or block device to format.
	COW string
	// ChunkSectors is the chunk size in sectors; 0 means
	// DefaultChunkSectors.
	ChunkSectors uint32
	// CreateBytes, if not zero, creates the COW as a sparse file of this
	// size; an existing file is then refused.
	CreateBytes int64
	// Force formats a COW that holds data.
	Force bool
	// Options are the snapshot's engine options.
	Options cow.SnapshotOptions
}

// checkSnapshotName refuses a name that cannot be a live snapshot's: it
// must be 1 to MaxSnapshotName bytes of printable UTF-8 without '/', ','
// or '=' (so that it can be given back to --snapshot NAME=COW), and not
// the origin's export.
func checkSnapshotName(name string) error {
	switch {
	case name == "" || len(name) > MaxSnapshotName:
		return fmt.Errorf("snapshot name %q: want 1 to %d bytes", name, MaxSnapshotName)
	case name == OriginExport:
		return fmt.Errorf("snapshot name %q: it is the origin's export", name)
	case !utf8.ValidString(name) || strings.IndexFunc(name, func(r rune) bool { return !unicode.IsPrint(r) || r == ' ' }) >= 0:
		return fmt.Errorf("snapshot name %q: want printable characters, no spaces", name)
	case strings.ContainsAny(name, "/,="):
		return fmt.Errorf("snapshot name %q: '/', ',' and '=' are not allowed", name)
	}
	return nil
}

// CreateSnapshot formats req.COW and adds it to the serving origin as a new
// snapshot, served at once if the Set has an Exporter. The snapshot is a
// cut of the origin's writes (cow.Origin.AddSnapshot): it holds every
// write acknowledged before the call, durably, and none started after it
// returns. With a catalog, the snapshot is recorded in it before the cut,
// so that a restarted server serves it again. In a cluster (which needs a
// catalog: the other nodes read the new snapshot from it) the change runs
// under the origin lock in EX (snapset.Member.Update): every node has
// drained and flushed its origin writes, and each adopts the new set, the
// snapshot opened and copied into, before it writes the origin again.
//
// A refusal (a bad or taken name, a COW that fails FormatCOW's checks)
// changes nothing; a COW formatted but not added is left formatted and
// unserved. Live changes run one at a time.
func (v *Set) CreateSnapshot(ctx context.Context, req CreateRequest) (SnapshotStatus, error) {
	if err := checkSnapshotName(req.Name); err != nil {
		return SnapshotStatus{}, &ConfigError{err}
	}
	if req.ChunkSectors == 0 {
		req.ChunkSectors = DefaultChunkSectors
	}
	v.changeMu.Lock()
	defer v.changeMu.Unlock()
	if v.find(req.Name) != nil {
		return SnapshotStatus{}, &ConfigError{fmt.Errorf("snapshot %s: %w", req.Name, ErrSnapshotExists)}
	}
	if v.member != nil && v.catalog == nil {
		return SnapshotStatus{}, &ConfigError{fmt.Errorf("snapshot %s: %w", req.Name, ErrNoCatalog)}
	}
	spec := SnapshotSpec{Name: req.Name, COW: req.COW, Type: persistent.TypeName, ChunkSectors: req.ChunkSectors, Options: req.Options}
	if _, err := FormatCOW(ctx, FormatSpec{Origin: v.config.Origin, COW: req.COW, ChunkSectors: req.ChunkSectors, CreateBytes: req.CreateBytes, Force: req.Force}); err != nil {
		return SnapshotStatus{}, fmt.Errorf("snapshot %s: %w", req.Name, err)
	}
	var s *served
	err := v.change(ctx, func(ctx context.Context) error {
		if v.find(req.Name) != nil { // another node created it meanwhile
			return &ConfigError{fmt.Errorf("snapshot %s: %w", req.Name, ErrSnapshotExists)}
		}
		var st exstore.Store
		var cd blockdev.Device
		var err error
		if s, st, cd, err = v.openSnapshot(ctx, spec); err != nil {
			return err
		}
		before := v.servedSnapshots()
		if err := v.record(append(before, s)); err != nil {
			_ = s.close()
			return err
		}
		if s.snap, err = v.Origin.AddSnapshot(spec.Name, st, cd, spec.Options); err != nil {
			_ = s.close()
			if rerr := v.record(before); rerr != nil {
				err = errors.Join(err, rerr)
			}
			return fmt.Errorf("snapshot %s: %w", spec.Name, err)
		}
		v.mu.Lock()
		v.snaps = append(v.snaps, s)
		v.mu.Unlock()
		return nil
	})
	if err != nil {
		return SnapshotStatus{}, err
	}
	if err := v.addExport(s); err != nil {
		return s.status(), fmt.Errorf("snapshot %s: created, but not served on this node: %w", req.Name, err)
	}
	return s.status(), nil
}

// ErrNoCatalog is wrapped by the refusal of a live change of a clustered
// origin served without a catalog.
var ErrNoCatalog = errors.New("a clustered origin changes its snapshots live only with a catalog on shared storage (serve --catalog PATH on every node): the other nodes read the new set from it")

// change runs f while no origin write is in flight and none starts: on one
// node under AddSnapshot's and RemoveSnapshot's own holds, in a cluster
// under the origin lock in EX, after which the set this node then serves
// is published. v.changeMu is held.
func (v *Set) change(ctx context.Context, f func(ctx context.Context) error) error {
	if v.member == nil {
		return f(ctx)
	}
	return v.member.Update(ctx, func(ctx context.Context, _ snapset.Set) (snapset.Set, error) {
		if err := f(ctx); err != nil {
			return snapset.Set{}, err
		}
		return v.currentSet()
	})
}

// record writes the catalog listing snaps, if the Set has a catalog.
func (v *Set) record(snaps []*served) error {
	if v.catalog == nil {
		return nil
	}
	rec := catalogRecord{Origin: v.origin, Snapshots: []catalogEntry{}}
	for _, s := range snaps {
		rec.Snapshots = append(rec.Snapshots, entryOf(s.spec, s.label))
	}
	return v.catalog.store(rec)
}

// currentSet is the snapshot set of the clustered snapshots served.
func (v *Set) currentSet() (snapset.Set, error) {
	var members []snapset.Snapshot
	v.mu.Lock()
	for _, s := range v.snaps {
		if s.identity != nil {
			members = append(members, snapset.Snapshot{Name: s.spec.Name, Identity: s.identity})
		}
	}
	v.mu.Unlock()
	return snapset.NewSet(members...)
}

// addExport serves s, if the Set has an Exporter.
func (v *Set) addExport(s *served) error {
	v.mu.Lock()
	x := v.exporter
	v.mu.Unlock()
	if x == nil {
		return nil
	}
	return x.AddExport(v.snapshotExport(s.snap))
}

// removeExport stops serving snapshot name (and the default export, if it
// is that snapshot), if the Set has an Exporter. It returns once their
// connections have closed.
func (v *Set) removeExport(ctx context.Context, name string) error {
	v.mu.Lock()
	x, def := v.exporter, v.defaultExport
	v.mu.Unlock()
	if x == nil {
		return nil
	}
	if def == name {
		if err := x.RemoveExport(ctx, ""); err != nil {
			return fmt.Errorf("snapshot %s: default export: %w", name, err)
		}
	}
	if err := x.RemoveExport(ctx, name); err != nil {
		return fmt.Errorf("snapshot %s: %w", name, err)
	}
	return nil
}

// find returns the served snapshot name, nil if there is none.
func (v *Set) find(name string) *served {
	v.mu.Lock()
	defer v.mu.Unlock()
	for _, s := range v.snaps {
		if s.spec.Name == name {
			return s
		}
	}
	return nil
}

// DeleteSnapshot stops serving snapshot name and takes it out of the
// origin: its export (and the default export, if it is that snapshot) is
// removed first, which waits for its clients' connections to close; then
// origin writes stop copying into it (in a cluster, on every node, under
// the origin lock as CreateSnapshot); then its COW is marked invalid
// (ErrDeleted) durably, since from then on the origin is written without
// copying into it, and its store and device are closed. With a catalog, it
// is taken out of the catalog too. The COW keeps its data otherwise;
// 'snapd create --force' formats it for reuse.
func (v *Set) DeleteSnapshot(ctx context.Context, name string) error {
	v.changeMu.Lock()
	defer v.changeMu.Unlock()
	s := v.find(name)
	if s == nil {
		return &ConfigError{fmt.Errorf("snapshot %s: %w", name, ErrNoSuchSnapshot)}
	}
	if mergeBusy(s.snap) {
		// Its COW holds what the origin reads: it goes when its merge ends.
		return &ConfigError{fmt.Errorf("snapshot %s: %w", name, cow.ErrMergeInProgress)}
	}
	if v.member != nil && v.catalog == nil {
		return &ConfigError{fmt.Errorf("snapshot %s: %w", name, ErrNoCatalog)}
	}
	if err := v.removeExport(ctx, name); err != nil {
		return err
	}
	var retired bool
	err := v.change(ctx, func(ctx context.Context) error {
		if v.find(name) != s {
			return fmt.Errorf("snapshot %s: %w", name, ErrNoSuchSnapshot) // another node deleted it meanwhile
		}
		rest := slices.DeleteFunc(v.servedSnapshots(), func(o *served) bool { return o == s })
		if err := v.record(rest); err != nil {
			return err
		}
		retired = true
		return v.retire(ctx, s, true)
	})
	if err != nil && !retired {
		if v.find(name) == s {
			// Still served: serve its export again.
			err = errors.Join(err, v.addExport(s))
		}
		return err
	}
	return err
}

// retire takes s out of the origin and the Set and closes it; with
// invalidate it marks its COW invalid (ErrDeleted) first. Its export is
// already gone.
func (v *Set) retire(ctx context.Context, s *served, invalidate bool) error {
	name := s.spec.Name
	if err := v.Origin.RemoveSnapshot(s.snap); err != nil {
		return fmt.Errorf("snapshot %s: %w", name, err)
	}
	v.mu.Lock()
	v.snaps = slices.DeleteFunc(slices.Clone(v.snaps), func(o *served) bool { return o == s })
	v.mu.Unlock()
	var errs []error
	if invalidate {
		if err := s.snap.Store().Invalidate(context.WithoutCancel(ctx), ErrDeleted); err != nil {
			errs = append(errs, fmt.Errorf("mark the COW %s invalid: %w", s.spec.COW, err))
		}
	}
	if err := s.close(); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("snapshot %s: taken out of the origin, but: %w", name, err)
	}
	return nil
}
