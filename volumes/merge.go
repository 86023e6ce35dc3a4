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

// ErrClusterMerge is wrapped by the refusals of a merge with a Cluster: the
// other nodes would go on serving the origin device as it is, not as the
// merge shows it, and their writes to the chunks the snapshot holds would
// be lost. A merge runs without one (snapd merge), with every node
// stopped.
var ErrClusterMerge = errors.New("a merge cannot run while the origin is served by a cluster")

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

// resumeMerge puts the origin back in merge mode with the snapshot whose
// COW's label says it merges (merging: the indexes in v.Snapshots), as
// Open found them; more than one is refused. The merge itself resumes when
// the caller runs it (Merge).
func (v *Set) resumeMerge(ctx context.Context, merging []int) error {
	switch len(merging) {
	case 0:
		return nil
	case 1:
	default:
		names := make([]string, len(merging))
		for i, k := range merging {
			names[i] = v.Snapshots[k].Name()
		}
		return fmt.Errorf("snapshots %v: each COW says it merges into the origin: %w", names, cow.ErrMergeInProgress)
	}
	s := v.Snapshots[merging[0]]
	if v.config.Cluster != nil {
		return fmt.Errorf("snapshot %s: its COW says it merges into the origin; finish the merge without --cluster-id first: %w", s.Name(), ErrClusterMerge)
	}
	if err := v.Origin.StartMerge(ctx, s); err != nil {
		return fmt.Errorf("snapshot %s: resume its merge: %w", s.Name(), err)
	}
	return nil
}

// Merge rolls the origin back to snapshot s while the origin may be
// served (cow.Origin.Merge): it records the merge in s's COW label before
// the origin switches to merge mode, so that an Open after a crash resumes
// it, runs it until s has no exceptions, and records it as done; s is then
// no longer the origin's snapshot, and its COW is refused as one until it
// is formatted again. It resumes the merge Open found under way (Merging)
// the same way. Canceling ctx stops the merge and leaves the origin in
// merge mode, right, until Merge runs again. s must be one of v's
// snapshots, and no longer served on its own. A Set with a Cluster refuses
// (ErrClusterMerge).
func (v *Set) Merge(ctx context.Context, s *cow.Snapshot, progress func(cow.MergeProgress)) error {
	i := slices.Index(v.Snapshots, s)
	if i < 0 {
		return fmt.Errorf("merge: snapshot %s is not one of the set's", s.Name())
	}
	if v.config.Cluster != nil {
		return fmt.Errorf("merge of snapshot %s: %w", s.Name(), ErrClusterMerge)
	}
	if m, _, ok := v.Origin.Merging(); !ok || m != s {
		// Open attached the marker of its snapshots; one added since
		// gets it here.
		s.SetMergeMarker(mergeMarker(s.Store(), v.clustered[i], v.origin))
	}
	return v.Origin.Merge(ctx, s, progress)
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
