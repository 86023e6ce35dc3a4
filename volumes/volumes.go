package volumes

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"unicode/utf8"

	"github.com/clustersnap/clustersnap/clusterized"
	"github.com/clustersnap/clustersnap/clusterized/snapset"
	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/exstore/cow"
	"github.com/clustersnap/clustersnap/exstore/transient"
	"github.com/clustersnap/clustersnap/lockc"
	"github.com/clustersnap/clustersnap/persistent"
)

// sysRoot is where sysfs is mounted, for OriginIdentity.
const sysRoot = "/sys"

// Config is what Open opens.
type Config struct {
	// Origin is the path of the origin image or block device.
	Origin string
	// Snapshots are the origin's snapshots, names unique.
	Snapshots []SnapshotSpec
	// Direct opens the devices with O_DIRECT.
	Direct bool
	// Cluster, if set, clusters the snapshots' stores.
	Cluster *Cluster
	// OriginID, if set, is the origin's id in the COWs' labels instead of
	// the one sysfs reports for it (see OriginIdentity).
	OriginID string
}

// ConfigError is an Open refusal of the Config itself, before any device
// is opened: the caller's mistake, not the devices'.
type ConfigError struct{ Err error }

func (e *ConfigError) Error() string { return e.Err.Error() }
func (e *ConfigError) Unwrap() error { return e.Err }

// Set is an origin and its snapshots, opened for serving.
type Set struct {
	// Origin is the engine's origin, its snapshots added.
	Origin *cow.Origin
	// Snapshots are the snapshots in the order of Config.Snapshots.
	Snapshots []*cow.Snapshot

	config    Config
	clustered []*clusterized.Store   // per snapshot, nil when not clustered
	member    *snapset.Member        // the origin's snapshot set, nil when not clustered
	labels    []string               // per snapshot, its COW label's UUID or ""
	origin    exstore.OriginIdentity // the origin's, as the COWs' labels name it
	closers   []io.Closer            // stores, then devices, in closing order
	lost      chan struct{}          // closed once a store's node loses the lockspace
	once      sync.Once
}

// Lost is closed once the node loses the lockspace of any clustered store
// (or the Set is closed): from then on the devices refuse all I/O with
// ErrClusterLost. It is never closed without a Cluster.
func (v *Set) Lost() <-chan struct{} { return v.lost }

// check refuses what no device needs to be opened to see.
func (c Config) check(reg *exstore.Registry) error {
	if len(c.OriginID) > persistent.MaxLabelOriginID || !utf8.ValidString(c.OriginID) {
		return fmt.Errorf("origin id %q: want at most %d bytes of UTF-8", c.OriginID, persistent.MaxLabelOriginID)
	}
	seen := map[string]bool{OriginExport: true}
	for _, s := range c.Snapshots {
		if seen[s.Name] {
			return fmt.Errorf("snapshot %s: the name is taken", s.Name)
		}
		seen[s.Name] = true
		t, ok := reg.Lookup(s.storeType())
		if !ok {
			return fmt.Errorf("snapshot %s: unknown store type %q (known: %s)", s.Name, s.Type, knownTypes())
		}
		if t.Name == transient.TypeName && c.Cluster != nil {
			return fmt.Errorf("snapshot %s: a transient store cannot be clustered: its exceptions live in one process's memory", s.Name)
		}
	}
	return nil
}

// Open opens the origin and every snapshot's COW device and each snapshot's
// store through the registry, without formatting; with a Cluster each store
// is clustered. Devices are opened with exclusive host-local locks, except
// with a Shared cluster: its other members are other hosts, so the devices
// are opened with O_DIRECT instead (a buffered open is refused) and no
// host-local lock is taken. With a Cluster, the node joins the origin's
// snapshot set (Cluster.OriginResource) with the snapshots of c, and fails
// with an error wrapping snapset.ErrSetMismatch if the cluster serves the
// origin with other snapshots; the origin's writes then pass the set's
// gate. With a Cluster, the devices stop all I/O once any store's node, or
// the set's, loses the lockspace (ErrClusterLost).
func Open(ctx context.Context, c Config) (*Set, error) {
	reg := newRegistry()
	if err := c.check(reg); err != nil {
		return nil, &ConfigError{err}
	}
	v := &Set{config: c, lost: make(chan struct{})}
	fail := func(err error) (*Set, error) {
		v.Close()
		return nil, err
	}
	oi, err := os.Stat(c.Origin)
	if err != nil {
		return nil, fmt.Errorf("origin: %w", err)
	}
	shared := c.Cluster != nil && c.Cluster.Shared
	devOpts := blockdev.Options{Direct: c.Direct || shared, Exclusive: !shared}
	od, err := openDevice(c.Origin, devOpts, shared)
	if err != nil {
		return nil, fmt.Errorf("origin: %w", err)
	}
	v.closers = append(v.closers, od)
	origin := OriginIdentity(od, c.Origin, sysRoot)
	if c.OriginID != "" {
		origin.ID = c.OriginID
	}
	v.origin = origin
	var lost *atomic.Bool // set when a store's node loses the lockspace
	fence := func(d blockdev.Device) blockdev.Device { return d }
	if c.Cluster != nil {
		lost = new(atomic.Bool)
		fence = func(d blockdev.Device) blockdev.Device { return fenceShared(d, c.Cluster.ID, lost) }
	}
	v.Origin = cow.NewOrigin(fence(od))
	onLost := func() {
		lost.Store(true)
		v.once.Do(func() { close(v.lost) })
	}
	var members []snapset.Snapshot
	var merging []int // the snapshots whose COW says they merge
	for _, spec := range c.Snapshots {
		if ci, err := os.Stat(spec.COW); err == nil && os.SameFile(oi, ci) {
			return fail(fmt.Errorf("snapshot %s: cow %s is the origin itself", spec.Name, spec.COW))
		}
		cd, err := openDevice(spec.COW, devOpts, shared)
		if err != nil {
			return fail(fmt.Errorf("snapshot %s: %w", spec.Name, err))
		}
		v.closers = append([]io.Closer{cd}, v.closers...)
		st, cs, err := openStore(ctx, reg, cd, spec, c.Cluster, origin, onLost)
		if err != nil {
			return fail(fmt.Errorf("snapshot %s: %w", spec.Name, err))
		}
		v.closers = append([]io.Closer{st}, v.closers...)
		s, err := v.Origin.AddSnapshot(spec.Name, st, fence(cd), spec.Options)
		if err != nil {
			return fail(fmt.Errorf("snapshot %s: %w", spec.Name, err))
		}
		v.Snapshots = append(v.Snapshots, s)
		v.clustered = append(v.clustered, cs)
		core := st
		if cs != nil {
			core = cs.Core()
		}
		v.labels = append(v.labels, labelUUID(ctx, core))
		s.SetMergeMarker(mergeMarker(st, cs, origin))
		if state, err := mergeStateOf(ctx, core); err != nil {
			return fail(fmt.Errorf("snapshot %s: %w", spec.Name, err))
		} else if state == exstore.Merging {
			merging = append(merging, len(v.Snapshots)-1)
		}
		if cs != nil {
			id, err := snapshotIdentity(ctx, spec, cs.Core())
			if err != nil {
				return fail(fmt.Errorf("snapshot %s: %w", spec.Name, err))
			}
			members = append(members, snapset.Snapshot{Name: spec.Name, Identity: id})
		}
	}
	if c.Cluster != nil {
		if err := v.joinSnapshotSet(ctx, c.Cluster, members, onLost); err != nil {
			return fail(err)
		}
	}
	if err := v.resumeMerge(ctx, merging); err != nil {
		return fail(err)
	}
	return v, nil
}

// snapshotIdentity is what identifies a snapshot's COW to the cluster's
// snapshot set: every node serving the COW computes the same. It is the
// snapshot's name (which names the COW's lock resource, so nodes must agree
// on it) and the UUID of the COW's label, which a clustered Open has
// stamped; a store without labels is identified by its name, size and
// chunk size instead.
func snapshotIdentity(ctx context.Context, spec SnapshotSpec, core exstore.Store) ([]byte, error) {
	if lb, ok := core.(exstore.Labeler); ok {
		l, _, err := lb.Label(ctx)
		if err != nil {
			return nil, err
		}
		if !l.UUID.IsZero() {
			return fmt.Appendf(nil, "name=%s cow=%s", spec.Name, l.UUID), nil
		}
	}
	u := core.Usage()
	return fmt.Appendf(nil, "name=%s cow-sectors=%d chunk-sectors=%d", spec.Name, u.TotalSectors, core.ChunkSectors()), nil
}

// labelUUID is the UUID of st's COW label, "" if it has none.
func labelUUID(ctx context.Context, st exstore.Store) string {
	lb, ok := st.(exstore.Labeler)
	if !ok {
		return ""
	}
	l, ok, err := lb.Label(ctx)
	if err != nil || !ok || l.UUID.IsZero() {
		return ""
	}
	return l.UUID.String()
}

// joinSnapshotSet joins the origin's snapshot set (package
// clusterized/snapset) with snaps, in its own membership of the cluster's
// lockspace, and puts the origin's writes behind its gate: a node whose
// snapshots are not the cluster's is refused (snapset.ErrSetMismatch), and
// this node writes the origin only while its set is the cluster's. onLost
// runs when the membership loses the lockspace.
func (v *Set) joinSnapshotSet(ctx context.Context, c *Cluster, snaps []snapset.Snapshot, onLost func()) error {
	set, err := snapset.NewSet(snaps...)
	if err != nil {
		return err
	}
	name := c.Lockspace
	if name == "" {
		name = clusterized.DefaultLockspace
	}
	ls, err := c.Engine.Open(ctx, name)
	if err != nil {
		return fmt.Errorf("cluster %s: lockspace %s: %w", c.ID, name, err)
	}
	if ln, ok := ls.(lockc.LostNotifier); ok {
		ln.OnLost(onLost)
	} else {
		go func() {
			<-ls.Lost()
			onLost()
		}()
	}
	m, err := snapset.Join(ctx, ls, c.OriginResource(), set)
	if err != nil {
		_ = ls.Close()
		return fmt.Errorf("cluster %s: %w", c.ID, err)
	}
	// The member is released before its lockspace, both before the stores.
	v.closers = append([]io.Closer{m, ls}, v.closers...)
	v.member = m
	v.Origin.SetGate(m)
	return nil
}

// openDevice opens a device; a shared one must be opened with O_DIRECT.
func openDevice(path string, o blockdev.Options, shared bool) (blockdev.Device, error) {
	d, err := blockdev.Open(path, o)
	if err != nil && shared {
		return nil, fmt.Errorf("%w; shared storage must be opened with O_DIRECT (another host's writes would be hidden by this host's page cache), so a buffered open is refused", err)
	}
	return d, err
}

// openStore opens spec's store on the COW device cd through reg, never
// formatting, and checks its label against origin (labelCOW). With a
// cluster, clusterized wraps it and opens it through reg again for its full
// reloads, so the clusterizer never knows the type; the label is checked
// and stamped on its core (clusterized passes no Labeler through) under the
// store's lock in EX, so a node that cannot join writes nothing and two
// nodes never stamp at once. onLost runs when the store's node loses the lockspace. It also
// returns the clusterized store, nil without a cluster.
func openStore(ctx context.Context, reg *exstore.Registry, cd blockdev.Device, spec SnapshotSpec, cluster *Cluster, origin exstore.OriginIdentity, onLost func()) (exstore.Store, *clusterized.Store, error) {
	args := exstore.Args{ChunkSectors: spec.ChunkSectors, NoFormat: true}
	if cluster == nil {
		st, err := reg.Open(ctx, spec.storeType(), cd, args)
		if err != nil {
			return nil, nil, err
		}
		if err := labelCOW(ctx, st, spec.COW, "", origin); err != nil {
			_ = st.Close()
			return nil, nil, err
		}
		return st, nil, nil
	}
	open := func(ctx context.Context, dev blockdev.Device) (exstore.Store, error) {
		return reg.Open(ctx, spec.storeType(), dev, args)
	}
	cs, err := clusterized.Open(ctx, cd, open, cluster.Engine, cluster.Resource(spec.Name), clusterized.Options{Lockspace: cluster.Lockspace})
	if err != nil {
		return nil, nil, err
	}
	// Under EX: the other nodes' stamps and header writes (an invalidation)
	// wait, so a stamp neither races another node's nor undoes its
	// invalidation.
	if err := cs.Exclusive(ctx, func(ctx context.Context, core exstore.Store) error {
		return labelCOW(ctx, core, spec.COW, cluster.ID, origin)
	}); err != nil {
		_ = cs.Close()
		return nil, nil, err
	}
	cs.OnLost(onLost)
	return cs.Exstore(), cs, nil // with lazy commits, as the bare store has them
}

// Close closes the stores, then the devices.
func (v *Set) Close() error {
	var errs []error
	for _, c := range v.closers {
		errs = append(errs, c.Close())
	}
	return errors.Join(errs...)
}
