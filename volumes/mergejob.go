package volumes

import (
	"context"
	"errors"
	"fmt"

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
// such snapshot, an invalid one, a merge of another snapshot under way, a
// Cluster) is its error, and leaves the merge running until it completes,
// fails, or the Set closes (which leaves the origin in merge mode, to be
// resumed by the next Open). With name "", it resumes the merge Open found
// under way. A merge of the same snapshot already running is no error.
// MergeJob reports it.
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
	if v.config.Cluster != nil {
		return MergeJobStatus{}, fmt.Errorf("merge of snapshot %s: %w", name, ErrClusterMerge)
	}
	if err := s.snap.Err(); err != nil && !mergeBusy(s.snap) {
		return MergeJobStatus{}, fmt.Errorf("merge of snapshot %s: cannot merge an invalid snapshot: %w", name, err)
	}
	if m, _, ok := v.Origin.Merging(); !ok || m != s.snap {
		if err := v.removeExport(ctx, name); err != nil {
			return MergeJobStatus{}, err
		}
		if err := v.Origin.StartMerge(ctx, s.snap); err != nil {
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
		job.err = v.Merge(jctx, s.snap, func(p cow.MergeProgress) { job.final = p })
	}()
	return v.MergeJob(), nil
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
