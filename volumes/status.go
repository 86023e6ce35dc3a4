package volumes

import (
	"github.com/clustersnap/clustersnap/clusterized"
	"github.com/clustersnap/clustersnap/nbd"
)

// Status is what a Set reports of itself while it serves: the origin, the
// cluster membership and each snapshot's store, with the cluster's
// counters of lock and metadata work.
type Status struct {
	Origin OriginStatus `json:"origin"`
	// Catalog is the path of the snapshot catalog, "" without one: then
	// snapshots created live are not served again after a restart.
	Catalog   string           `json:"catalog,omitempty"`
	Cluster   *ClusterStatus   `json:"cluster,omitempty"`
	Snapshots []SnapshotStatus `json:"snapshots"`
	// Exports are the NBD exports served now with their clients and
	// counters, when the Set's Exporter keeps them (nbd.Server does).
	Exports []ExportStatus `json:"exports,omitempty"`
	// MergeJob is the background merge running or run last
	// (StartMerge), nil if there was none.
	MergeJob *MergeJobStatus `json:"merge_job,omitempty"`
}

// ExportStatus is one NBD export's clients and request counters since it
// was added (nbd.ExportStats). Name is "" for the default export.
type ExportStatus struct {
	Name             string `json:"name"`
	Clients          uint64 `json:"clients"`
	ConnectionsTotal uint64 `json:"connections_total"`
	Reads            uint64 `json:"reads"`
	ReadBytes        uint64 `json:"read_bytes"`
	Writes           uint64 `json:"writes"`
	WrittenBytes     uint64 `json:"written_bytes"`
	Flushes          uint64 `json:"flushes"`
	Trims            uint64 `json:"trims"`
	Zeroes           uint64 `json:"zeroes"`
	BlockStatus      uint64 `json:"block_status"`
	Errors           uint64 `json:"errors"`
}

// statsReporter is an Exporter that counts its exports' work.
type statsReporter interface {
	Stats() []nbd.ExportStats
}

// OriginStatus describes the origin.
type OriginStatus struct {
	Path      string `json:"path"`
	SizeBytes int64  `json:"size_bytes"`
}

// ClusterStatus describes this node's cluster membership.
type ClusterStatus struct {
	ID        string `json:"id"`
	Engine    string `json:"lock_engine"`
	Lockspace string `json:"lockspace"`
	// NodeID is this node's id in the lock engine's cluster (the DLM's
	// corosync node id); 0 when no store is clustered.
	NodeID uint32 `json:"node_id"`
	// Lost says the node lost the lockspace: shared I/O has stopped.
	Lost bool `json:"lost"`
	// SnapshotSet is the origin's snapshot set as this node last read it
	// from the origin lock (package clusterized/snapset).
	SnapshotSet *SnapshotSetStatus `json:"snapshot_set,omitempty"`
}

// SnapshotSetStatus is the published snapshot set.
type SnapshotSetStatus struct {
	Snapshots  int    `json:"snapshots"`
	Generation uint64 `json:"generation"`
	Digest     string `json:"digest"`
}

// SnapshotStatus describes one snapshot's store.
type SnapshotStatus struct {
	Name             string `json:"name"`
	COW              string `json:"cow"`
	UUID             string `json:"cow_uuid,omitempty"` // the COW label's, when it has one
	State            string `json:"state"`              // valid, or the error that invalidated the snapshot
	Exceptions       uint64 `json:"exceptions"`
	AllocatedSectors uint64 `json:"allocated_sectors"`
	TotalSectors     uint64 `json:"total_sectors"`
	MetadataSectors  uint64 `json:"metadata_sectors"`
	// Cluster counts the store's cluster work: lock conversions, metadata
	// refreshes (incremental) and reloads (full). Nil when not clustered.
	Cluster *ClusterCounters `json:"cluster,omitempty"`
	// Merge is the progress of the snapshot's merge into the origin,
	// while the origin is in merge mode with it; nil otherwise.
	Merge *MergeStatus `json:"merge,omitempty"`
}

// MergeStatus is a merge's progress: exceptions merged, of the total the
// snapshot had when the origin entered merge mode (or when Open resumed
// it).
type MergeStatus struct {
	Done  uint64 `json:"done"`
	Total uint64 `json:"total"`
}

// ClusterCounters are a clustered store's counters (clusterized.Stats).
type ClusterCounters struct {
	UpConverts   uint64 `json:"up_conversions"`
	DownConverts uint64 `json:"down_conversions"`
	Publishes    uint64 `json:"counter_publishes"`
	Refreshes    uint64 `json:"incremental_refreshes"`
	Reloads      uint64 `json:"full_reloads"`
	InvalidLVBs  uint64 `json:"invalid_lvbs"`
	Drains       uint64 `json:"drains"`
}

func countersOf(s clusterized.Stats) *ClusterCounters {
	return &ClusterCounters{
		UpConverts: s.UpConverts, DownConverts: s.DownConverts, Publishes: s.Publishes,
		Refreshes: s.Refreshes, Reloads: s.Reloads, InvalidLVBs: s.InvalidLVBs, Drains: s.Drains,
	}
}

// Status reports the Set as it is now; it is safe while serving.
func (v *Set) Status() Status {
	st := Status{Origin: OriginStatus{Path: v.config.Origin, SizeBytes: v.Origin.Size()}, Catalog: v.config.Catalog}
	if c := v.config.Cluster; c != nil {
		cs := &ClusterStatus{ID: c.ID, Engine: c.EngineName, Lockspace: c.Lockspace}
		if cs.Lockspace == "" {
			cs.Lockspace = clusterized.DefaultLockspace
		}
		select {
		case <-v.lost:
			cs.Lost = true
		default:
		}
		for _, s := range v.servedSnapshots() {
			if s.clustered != nil {
				cs.NodeID = s.clustered.NodeID()
				break
			}
		}
		if v.member != nil {
			val := v.member.Value()
			cs.SnapshotSet = &SnapshotSetStatus{Snapshots: int(val.Count), Generation: val.Generation, Digest: val.Digest.String()}
		}
		st.Cluster = cs
	}
	merging, p, _ := v.Origin.Merging()
	for _, s := range v.servedSnapshots() {
		ss := s.status()
		if s.snap == merging {
			ss.Merge = &MergeStatus{Done: p.Done, Total: p.Total}
		}
		st.Snapshots = append(st.Snapshots, ss)
	}
	if job := v.MergeJob(); job.State != "" {
		st.MergeJob = &job
	}
	v.mu.Lock()
	sr, ok := v.exporter.(statsReporter)
	v.mu.Unlock()
	if ok {
		for _, e := range sr.Stats() {
			st.Exports = append(st.Exports, ExportStatus{
				Name: e.Name, Clients: e.ConnectionsOpen, ConnectionsTotal: e.ConnectionsTotal,
				Reads: e.Reads, ReadBytes: e.ReadBytes, Writes: e.Writes, WrittenBytes: e.WrittenBytes,
				Flushes: e.Flushes, Trims: e.Trims, Zeroes: e.Zeroes, BlockStatus: e.BlockStatus, Errors: e.Errors,
			})
		}
	}
	return st
}

// status reports one served snapshot.
func (s *served) status() SnapshotStatus {
	u := s.snap.Store().Usage()
	ss := SnapshotStatus{
		Name: s.snap.Name(), COW: s.spec.COW, UUID: s.label, State: "valid",
		Exceptions: u.Exceptions, AllocatedSectors: u.AllocatedSectors,
		TotalSectors: u.TotalSectors, MetadataSectors: u.MetadataSectors,
	}
	if err := s.snap.Err(); err != nil {
		ss.State = err.Error()
	}
	if s.clustered != nil {
		ss.Cluster = countersOf(s.clustered.Stats())
	}
	return ss
}
