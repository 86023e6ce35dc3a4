package volumes

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/clustersnap/clustersnap/clusterized"
	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/cow"
)

// ErrMergedCOW is wrapped by Open's refusal of a COW whose snapshot was
// merged into its origin: it holds no view any more.
var ErrMergedCOW = errors.New("merged into its origin; format it again to reuse")

// ErrClusterMerge is wrapped by Merge's refusal with a Cluster: there the
// merge runs in steps under the origin lock, so that every node follows
// it (StartMerge).
var ErrClusterMerge = errors.New("a clustered origin merges in steps, one node at a time: use StartMerge")

// mergeStateOf is the merge state of the COW whose store (a clustered
// store's core) is st, from its label; NotMerging for a store without
// labels or a COW without one.
func mergeStateOf(ctx context.Context, st exstore.Store) (exstore.MergeState, error) {
	lb, ok := st.(exstore.Labeler)
	if !ok {
		return exstore.NotMerging, nil
	}
	l, _, err := lb.Label(ctx)
	if err != nil {
		return exstore.NotMerging, err
	}
	return l.Merge, nil
}

// mergeMarker is the cow.MergeMarker of a snapshot whose store is st, or
// cs for a clustered one (nil otherwise), for the origin identified as
// origin: it records the merge in the COW's label, a clustered store's
// under its lock in EX, so that no other node's label or header write
// races it. A store without labels records nothing (nil).
func mergeMarker(st exstore.Store, cs *clusterized.Store, origin exstore.OriginIdentity) cow.MergeMarker {
	if cs != nil {
		if _, ok := cs.Core().(exstore.Labeler); !ok {
			return nil
		}
		return func(ctx context.Context, state exstore.MergeState) error {
			return cs.Exclusive(ctx, func(ctx context.Context, core exstore.Store) error {
				lb, ok := core.(exstore.Labeler)
				if !ok {
					return fmt.Errorf("the store reloaded without labels")
				}
				return cow.LabelMarker(lb, origin)(ctx, state)
			})
		}
	}
	if lb, ok := st.(exstore.Labeler); ok {
		return cow.LabelMarker(lb, origin)
	}
	return nil
}

// merger is the marker a merge of s records itself with: in the COW's
// label (mergeMarker), and, at its end, by taking s out of the catalog
// first. A crash between the two leaves a COW that says it merges, with
// no exceptions left, out of the catalog: the origin is merged, and a
// later Open of the COW finishes its merge at once.
func (v *Set) merger(s *served) cow.MergeMarker {
	label := mergeMarker(s.snap.Store(), s.clustered, v.origin)
	return func(ctx context.Context, state exstore.MergeState) error {
		if state == exstore.Merged && v.catalog != nil {
			v.changeMu.Lock()
			err := v.record(slices.DeleteFunc(v.servedSnapshots(), func(o *served) bool { return o == s }))
			v.changeMu.Unlock()
			if err != nil {
				return err
			}
		}
		if label == nil {
			return nil
		}
		return label(ctx, state)
	}
}

// noteMerge gives s, just opened and added to the origin, its merge
// marker, and reports whether its COW's label says it merges.
func (v *Set) noteMerge(ctx context.Context, s *served, st exstore.Store) (bool, error) {
	if v.member != nil || v.config.Cluster != nil {
		// A node merges the snapshot of a cluster in steps, and records
		// its end in the catalog itself (clusterMerger); every other
		// node only follows.
		s.snap.SetMergeMarker(mergeMarker(s.snap.Store(), s.clustered, v.origin))
	} else {
		s.snap.SetMergeMarker(v.merger(s))
	}
	core := st
	if s.clustered != nil {
		core = s.clustered.Core()
	}
	state, err := mergeStateOf(ctx, core)
	if err != nil {
		return false, fmt.Errorf("snapshot %s: %w", s.spec.Name, err)
	}
	return state == exstore.Merging, nil
}

// resumeMerge puts the origin back in merge mode with the snapshot whose
// COW's label says it merges, as Open found them (merging); more than one
// is refused. The merge itself resumes when the caller runs it (Merge).
func (v *Set) resumeMerge(ctx context.Context, merging []*served) error {
	switch len(merging) {
	case 0:
		return nil
	case 1:
	default:
		names := make([]string, len(merging))
		for i, s := range merging {
			names[i] = s.spec.Name
		}
		return fmt.Errorf("snapshots %v: each COW says it merges into the origin: %w", names, cow.ErrMergeInProgress)
	}
	s := merging[0]
	if err := v.Origin.StartMerge(ctx, s.snap); err != nil {
		return fmt.Errorf("snapshot %s: resume its merge: %w", s.spec.Name, err)
	}
	return nil
}

// Merge rolls the origin back to snapshot s while the origin may be
// served (cow.Origin.Merge). It stops serving s's export first (and
// waits for its connections to close), records the merge in s's COW label
// before the origin switches to merge mode, so that an Open after a crash
// resumes it, runs it until s has no exceptions, and records it as done:
// s is then taken out of the catalog, if the Set has one, and of the Set,
// and closed; its COW is refused as a snapshot until it is formatted
// again. It resumes the merge Open found under way (Merging) the same
// way. Canceling ctx stops the merge and leaves the origin in merge mode,
// right, until Merge runs again. A Set with a Cluster refuses
// (ErrClusterMerge).
func (v *Set) Merge(ctx context.Context, s *cow.Snapshot, progress func(cow.MergeProgress)) error {
	if v.config.Cluster != nil {
		return fmt.Errorf("merge of snapshot %s: %w", s.Name(), ErrClusterMerge)
	}
	i := slices.IndexFunc(v.servedSnapshots(), func(o *served) bool { return o.snap == s })
	if i < 0 {
		return fmt.Errorf("merge: snapshot %s is not one of the set's", s.Name())
	}
	sv := v.servedSnapshots()[i]
	if m, _, ok := v.Origin.Merging(); !ok || m != s {
		// Its own I/O stops before the origin switches.
		if err := v.removeExport(ctx, sv.spec.Name); err != nil {
			return err
		}
	}
	if err := v.Origin.Merge(ctx, s, progress); err != nil {
		if _, _, ok := v.Origin.Merging(); !ok && !mergeBusy(s) {
			// The merge never began: serve the snapshot again.
			err = errors.Join(err, v.addExport(sv))
		}
		return err
	}
	v.mu.Lock()
	v.snaps = slices.DeleteFunc(slices.Clone(v.snaps), func(o *served) bool { return o == sv })
	v.mu.Unlock()
	if err := sv.close(); err != nil {
		return fmt.Errorf("snapshot %s: merged, but: %w", sv.spec.Name, err)
	}
	return nil
}

// Merging returns the snapshot whose merge is under way, which Open
// resumed or Merge started, with its progress, while the origin is in
// merge mode: the caller runs Merge to finish it.
func (v *Set) Merging() (*cow.Snapshot, cow.MergeProgress, bool) {
	return v.Origin.Merging()
}

// mergeBusy reports whether s merges, or was merged, into the origin: its
// view is the origin's, so it is no export of its own.
func mergeBusy(s *cow.Snapshot) bool {
	err := s.Err()
	return errors.Is(err, cow.ErrMerging) || errors.Is(err, cow.ErrMerged)
}
