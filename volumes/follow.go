package volumes

import (
	"context"
	"fmt"
	"slices"

	"github.com/clustersnap/clustersnap/clusterized/snapset"
	"github.com/clustersnap/clustersnap/exstore"
)

// follower adopts the snapshot sets other nodes publish (snapset.Follower).
type follower struct{ v *Set }

var _ snapset.Follower = follower{}

// Quiesced flushes the origin: the writes drained before another node
// takes a snapshot are durable in it.
func (f follower) Quiesced(ctx context.Context) error { return f.v.Origin.Flush(ctx) }

// Adopt serves the set the catalog lists: snapshots it no longer lists are
// unexported and taken out of the origin (the node that deleted them
// marked their COWs invalid), new ones are opened, added and exported. No
// origin write of this node is in flight meanwhile.
func (f follower) Adopt(ctx context.Context, val snapset.Value) (snapset.Set, error) {
	v := f.v
	if err := v.followMerges(ctx); err != nil {
		return snapset.Set{}, err
	}
	if v.catalog == nil {
		if set, err := v.currentSet(); err == nil && set.Matches(val) {
			return set, nil // a merge step: nothing else to read
		}
		return snapset.Set{}, ErrNoCatalog
	}
	rec, ok, err := v.catalog.load()
	if err != nil {
		return snapset.Set{}, err
	}
	if !ok {
		return snapset.Set{}, fmt.Errorf("catalog %s: %w: it lists no snapshots, but the cluster published %s", v.catalog.path, ErrBadCatalog, val)
	}
	want := map[string]catalogEntry{}
	for _, e := range rec.Snapshots {
		want[e.Name] = e
	}
	for _, s := range v.servedSnapshots() {
		if e, ok := want[s.spec.Name]; ok && e.COW == s.spec.COW && (e.UUID == "" || e.UUID == s.label) {
			delete(want, s.spec.Name)
			continue
		}
		if err := v.removeExport(ctx, s.spec.Name); err != nil {
			return snapset.Set{}, err
		}
		if err := v.retire(ctx, s, false); err != nil {
			return snapset.Set{}, err
		}
	}
	for _, e := range rec.Snapshots {
		if _, ok := want[e.Name]; !ok {
			continue
		}
		s, st, cd, err := v.openSnapshot(ctx, e.spec())
		if err != nil {
			return snapset.Set{}, err
		}
		if e.UUID != "" && e.UUID != s.label {
			_ = s.close()
			return snapset.Set{}, fmt.Errorf("snapshot %s: cow %s has UUID %s, but the catalog names %s: this host sees another device at that path", e.Name, e.COW, s.label, e.UUID)
		}
		if s.snap, err = v.Origin.AddSnapshot(e.Name, st, cd, e.spec().Options); err != nil {
			_ = s.close()
			return snapset.Set{}, fmt.Errorf("snapshot %s: %w", e.Name, err)
		}
		v.mu.Lock()
		v.snaps = append(v.snaps, s)
		v.mu.Unlock()
		if err := v.addExport(s); err != nil {
			return snapset.Set{}, fmt.Errorf("snapshot %s: %w", e.Name, err)
		}
	}
	return v.currentSet()
}

// followMerges brings this node's merge mode in line with the COW labels
// of the snapshots it serves, which the merging node changes under the
// origin lock: a snapshot whose label says it merges is unexported and
// the origin switched to merge mode with it; while it merges, its store
// re-reads what the last step cleared (this node's cached lookups would
// send writes to COW chunks already merged); once its label says merged,
// this node ends its merge mode (nothing is left to merge) and drops it.
// No origin change of this node runs meanwhile.
func (v *Set) followMerges(ctx context.Context) error {
	for _, s := range v.servedSnapshots() {
		if s.clustered == nil {
			continue
		}
		state, err := mergeStateOf(ctx, s.clustered.Core())
		if err != nil {
			return fmt.Errorf("snapshot %s: %w", s.spec.Name, err)
		}
		m, _, merging := v.Origin.Merging()
		mine := merging && m == s.snap
		switch {
		case state == exstore.Merging && !mine && !v.breaks.noMergeMode:
			if err := v.removeExport(ctx, s.spec.Name); err != nil {
				return err
			}
			if err := v.Origin.StartMerge(ctx, s.snap); err != nil {
				return fmt.Errorf("snapshot %s: follow its merge: %w", s.spec.Name, err)
			}
			if err := v.reidentify(ctx, s); err != nil {
				return err
			}
		case state == exstore.Merging && mine && !v.breaks.noRefresh:
			if err := s.snap.Store().Refresh(ctx); err != nil {
				return fmt.Errorf("snapshot %s: re-read the merge's progress: %w", s.spec.Name, err)
			}
		case state == exstore.Merged && mine:
			if err := s.snap.Store().Refresh(ctx); err != nil {
				return fmt.Errorf("snapshot %s: re-read the merge's progress: %w", s.spec.Name, err)
			}
			if err := v.Origin.Merge(ctx, s.snap, nil); err != nil {
				return fmt.Errorf("snapshot %s: end its merge: %w", s.spec.Name, err)
			}
			v.mu.Lock()
			v.snaps = slices.DeleteFunc(slices.Clone(v.snaps), func(o *served) bool { return o == s })
			v.mu.Unlock()
			if err := s.close(); err != nil {
				return fmt.Errorf("snapshot %s: merged, but: %w", s.spec.Name, err)
			}
		}
	}
	return nil
}
