package volumes

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/cow"
)

// The states of a background merge (MergeJobStatus.State).
const (
	MergeRunning = "running"
	MergeDone    = "done"
	MergeFailed  = "failed"
)

// MergeJobStatus is the background merge the Set runs or ran last
// (StartMerge): which snapshot, how far, and how it ended.
type MergeJobStatus struct {
	Snapshot string `json:"snapshot"`
	State    string `json:"state"`
	Done     uint64 `json:"done"`
	Total    uint64 `json:"total"`
	Error    string `json:"error,omitempty"`
}

// mergeJob is a merge running in the background of the Set.
type mergeJob struct {
	name   string
	cancel context.CancelFunc
	done   chan struct{}
	// Set before done is closed.
	err   error
	final cow.MergeProgress
}

// StartMerge rolls the origin back to snapshot name while it is served,
// in the background: it stops serving the snapshot's export and puts the
// origin in merge mode (Merge) before it returns, so that a refusal (no
// such snapshot, an invalid one, a merge of another snapshot under way) is
// its error, and leaves the merge running until it completes, fails, or
// the Set closes (which leaves the origin in merge mode, to be resumed by
// the next Open). With name "", it resumes the merge under way (Open found
// it, or, in a cluster, another node started it). A merge of the same
// snapshot already running is no error. MergeJob reports it.
//
// With a Cluster, the switch to merge mode and every step of the merge
// (clusterMerge) run under the origin lock in EX, and every other node
// follows them (follower.Adopt, followMerges) before it writes the origin
// again. One node runs the merge; another that is asked to runs steps
// too, which is safe (each step is the cluster's only origin change) but
// buys nothing.
func (v *Set) StartMerge(ctx context.Context, name string) (MergeJobStatus, error) {
	v.changeMu.Lock()
	defer v.changeMu.Unlock()
	v.mu.Lock()
	job := v.merge
	v.mu.Unlock()
	if job != nil {
		select {
		case <-job.done:
		default:
			if name == "" || name == job.name {
				return v.MergeJob(), nil
			}
			return MergeJobStatus{}, fmt.Errorf("merge of snapshot %s: snapshot %s merges: %w", name, job.name, cow.ErrMergeInProgress)
		}
	}
	var s *served
	if name == "" {
		m, _, ok := v.Origin.Merging()
		if !ok {
			return MergeJobStatus{}, &ConfigError{errors.New("merge: no merge is under way; name the snapshot")}
		}
		name = m.Name()
	}
	if s = v.find(name); s == nil {
		return MergeJobStatus{}, &ConfigError{fmt.Errorf("merge of snapshot %s: %w", name, ErrNoSuchSnapshot)}
	}
	if err := s.snap.Err(); err != nil && !mergeBusy(s.snap) {
		return MergeJobStatus{}, fmt.Errorf("merge of snapshot %s: cannot merge an invalid snapshot: %w", name, err)
	}
	if v.member != nil {
		// The node that merges records the end in the catalog, under the
		// origin lock, where the job holds changeMu.
		s.snap.SetMergeMarker(v.clusterMerger(s))
	}
	if m, _, ok := v.Origin.Merging(); !ok || m != s.snap {
		if err := v.removeExport(ctx, name); err != nil {
			return MergeJobStatus{}, err
		}
		// In a cluster, every node switches to merge mode before any
		// writes again (follower.Adopt): the set's identity of the
		// snapshot says it merges.
		err := v.change(ctx, func(ctx context.Context) error {
			if err := v.Origin.StartMerge(ctx, s.snap); err != nil {
				return err
			}
			return v.reidentify(ctx, s)
		})
		if err != nil {
			return MergeJobStatus{}, errors.Join(fmt.Errorf("merge of snapshot %s: %w", name, err), v.addExport(s))
		}
	}
	jctx, cancel := context.WithCancel(context.Background())
	job = &mergeJob{name: name, cancel: cancel, done: make(chan struct{})}
	v.mu.Lock()
	v.merge = job
	v.mu.Unlock()
	go func() {
		defer close(job.done)
		progress := func(p cow.MergeProgress) { job.final = p }
		if v.member == nil {
			job.err = v.Merge(jctx, s.snap, progress)
			return
		}
		job.err = v.clusterMerge(jctx, s, progress)
	}()
	return v.MergeJob(), nil
}

// ClusterMergeStep bounds what one step of a clustered merge merges unless
// Config.MergeStep says otherwise: the cluster's origin writes wait while
// a step runs.
const ClusterMergeStep = 8 << 20

// clusterMerge merges s in steps of Config.MergeStep, each under the
// origin lock in EX (Member.Update) while every other node's origin writes
// wait; each step publishes the set again, so that the other nodes re-read
// what s still holds before they write (follower.Adopt). The last step
// ends the merge, takes s out of the catalog and the set, and publishes
// the set without it.
func (v *Set) clusterMerge(ctx context.Context, s *served, progress func(cow.MergeProgress)) error {
	for {
		var more bool
		var stepErr error
		began := time.Now()
		v.changeMu.Lock()
		err := v.change(ctx, func(ctx context.Context) error {
			// A step that fails part-way may have merged runs: the set
			// is published all the same, so that the others catch up.
			more, stepErr = v.Origin.MergeStep(ctx, s.snap, v.mergeStep, progress)
			if stepErr == nil && !more {
				v.mu.Lock()
				v.snaps = slices.DeleteFunc(slices.Clone(v.snaps), func(o *served) bool { return o == s })
				v.mu.Unlock()
			}
			return nil
		})
		v.changeMu.Unlock()
		if err == nil {
			err = stepErr
		}
		if errors.Is(err, cow.ErrMerged) {
			return nil // another node ran the last step, and this one followed
		}
		if err != nil {
			return fmt.Errorf("merge of snapshot %s: %w", s.spec.Name, err)
		}
		if !more {
			if err := s.close(); err != nil {
				return fmt.Errorf("snapshot %s: merged, but: %w", s.spec.Name, err)
			}
			return nil
		}
		// A step holds every node's origin writes: leave them at least
		// as long to go on before the next one, or the merge would
		// starve them (the next EX request would queue at once).
		pause := time.NewTimer(min(time.Since(began), maxMergePause))
		select {
		case <-pause.C:
		case <-ctx.Done():
			pause.Stop()
			return fmt.Errorf("merge of snapshot %s: %w", s.spec.Name, ctx.Err())
		}
	}
}

// maxMergePause bounds the pause between two steps of a clustered merge.
const maxMergePause = time.Second

// clusterMerger records the merge of s by the node that runs it: in the
// COW's label and, at its end, first by taking s out of the catalog, as
// merger does; its caller holds changeMu.
func (v *Set) clusterMerger(s *served) cow.MergeMarker {
	label := mergeMarker(s.snap.Store(), s.clustered, v.origin)
	return func(ctx context.Context, state exstore.MergeState) error {
		if state == exstore.Merged {
			if err := v.record(slices.DeleteFunc(v.servedSnapshots(), func(o *served) bool { return o == s })); err != nil {
				return err
			}
		}
		if label == nil {
			return nil
		}
		return label(ctx, state)
	}
}

// reidentify recomputes s's identity in the snapshot set from its COW's
// label (a merging snapshot is another member).
func (v *Set) reidentify(ctx context.Context, s *served) error {
	if s.clustered == nil {
		return nil
	}
	id, err := snapshotIdentity(ctx, s.spec, s.clustered.Core())
	if err != nil {
		return fmt.Errorf("snapshot %s: %w", s.spec.Name, err)
	}
	v.mu.Lock()
	s.identity = id
	v.mu.Unlock()
	return nil
}

// MergeJob reports the background merge running or run last; its State is
// "" if there was none.
func (v *Set) MergeJob() MergeJobStatus {
	v.mu.Lock()
	job := v.merge
	v.mu.Unlock()
	if job == nil {
		return MergeJobStatus{}
	}
	st := MergeJobStatus{Snapshot: job.name, State: MergeRunning}
	select {
	case <-job.done:
		st.Done, st.Total = job.final.Done, job.final.Total
		st.State = MergeDone
		if job.err != nil {
			st.State, st.Error = MergeFailed, job.err.Error()
		}
	default:
		if m, p, ok := v.Origin.Merging(); ok && m.Name() == job.name {
			st.Done, st.Total = p.Done, p.Total
		}
	}
	return st
}

// WaitMerge waits for the background merge running or run last to end,
// or for ctx to end, and reports it.
func (v *Set) WaitMerge(ctx context.Context) (MergeJobStatus, error) {
	v.mu.Lock()
	job := v.merge
	v.mu.Unlock()
	if job == nil {
		return MergeJobStatus{}, errors.New("no merge was started")
	}
	select {
	case <-job.done:
		return v.MergeJob(), nil
	case <-ctx.Done():
		return v.MergeJob(), ctx.Err()
	}
}

// stopMerge cancels the background merge, if one runs, and waits for it:
// the origin stays in merge mode, recorded in the COW's label.
func (v *Set) stopMerge() {
	v.mu.Lock()
	job := v.merge
	v.mu.Unlock()
	if job != nil {
		job.cancel()
		<-job.done
	}
}
