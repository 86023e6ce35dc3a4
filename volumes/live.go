package volumes

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"unicode"
	"unicode/utf8"

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
// returns. A refusal (a bad or taken name, a COW that fails FormatCOW's
// checks) changes nothing; a COW formatted but not added is left formatted
// and unserved. Live changes run one at a time.
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
	if v.config.Cluster != nil {
		return SnapshotStatus{}, fmt.Errorf("snapshot %s: live snapshots of a clustered origin are not supported yet", req.Name)
	}
	spec := SnapshotSpec{Name: req.Name, COW: req.COW, Type: persistent.TypeName, ChunkSectors: req.ChunkSectors, Options: req.Options}
	if _, err := FormatCOW(ctx, FormatSpec{Origin: v.config.Origin, COW: req.COW, ChunkSectors: req.ChunkSectors, CreateBytes: req.CreateBytes, Force: req.Force}); err != nil {
		return SnapshotStatus{}, fmt.Errorf("snapshot %s: %w", req.Name, err)
	}
	s, st, cd, err := v.openSnapshot(ctx, spec)
	if err != nil {
		return SnapshotStatus{}, err
	}
	if s.snap, err = v.Origin.AddSnapshot(spec.Name, st, cd, spec.Options); err != nil {
		_ = s.close()
		return SnapshotStatus{}, fmt.Errorf("snapshot %s: %w", spec.Name, err)
	}
	v.mu.Lock()
	v.snaps = append(v.snaps, s)
	x := v.exporter
	v.mu.Unlock()
	if x != nil {
		if err := x.AddExport(v.snapshotExport(s.snap)); err != nil {
			err = fmt.Errorf("snapshot %s: export: %w", spec.Name, err)
			if rerr := v.retire(ctx, s); rerr != nil {
				err = errors.Join(err, rerr)
			}
			return SnapshotStatus{}, err
		}
	}
	return s.status(), nil
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
// origin writes stop copying into it; then its COW is marked invalid
// (ErrDeleted) durably, since from then on the origin is written without
// copying into it, and its store and device are closed. The COW keeps its
// data otherwise; 'snapd create --force' formats it for reuse.
func (v *Set) DeleteSnapshot(ctx context.Context, name string) error {
	v.changeMu.Lock()
	defer v.changeMu.Unlock()
	s := v.find(name)
	if s == nil {
		return &ConfigError{fmt.Errorf("snapshot %s: %w", name, ErrNoSuchSnapshot)}
	}
	if v.config.Cluster != nil {
		return fmt.Errorf("snapshot %s: live deletion on a clustered origin is not supported yet", name)
	}
	v.mu.Lock()
	x, def := v.exporter, v.defaultExport
	v.mu.Unlock()
	if x != nil {
		if def == name {
			if err := x.RemoveExport(ctx, ""); err != nil {
				return fmt.Errorf("snapshot %s: default export: %w", name, err)
			}
		}
		if err := x.RemoveExport(ctx, name); err != nil {
			return fmt.Errorf("snapshot %s: %w", name, err)
		}
	}
	return v.retire(ctx, s)
}

// retire takes s out of the origin and the Set, marks its COW invalid
// (ErrDeleted) and closes it. Its export is already gone.
func (v *Set) retire(ctx context.Context, s *served) error {
	name := s.spec.Name
	if err := v.Origin.RemoveSnapshot(s.snap); err != nil {
		return fmt.Errorf("snapshot %s: %w", name, err)
	}
	v.mu.Lock()
	for i, o := range v.snaps {
		if o == s {
			v.snaps = append(v.snaps[:i:i], v.snaps[i+1:]...)
			break
		}
	}
	v.mu.Unlock()
	var errs []error
	if err := s.snap.Store().Invalidate(context.WithoutCancel(ctx), ErrDeleted); err != nil {
		errs = append(errs, fmt.Errorf("mark the COW %s invalid: %w", s.spec.COW, err))
	}
	if err := s.close(); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("snapshot %s: taken out of the origin, but: %w", name, err)
	}
	return nil
}
