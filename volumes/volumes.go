package volumes

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"
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
	// Catalog, if set, is the path of the origin's snapshot catalog
	// (catalog.go), created as a file if nothing is there: live changes
	// are recorded in it, and once it holds a record it lists the
	// snapshots Open serves (Snapshots may then only repeat some of them).
	// A clustered origin needs one, on shared storage, to change its
	// snapshots live.
	Catalog string
	// afterCatalog, if set, runs once the catalog was read (tests: a
	// set changed before the join).
	afterCatalog func()
	// MergeStep, with a Cluster, bounds what one step of a live merge run
	// on this node merges (StartMerge): the other nodes' origin writes
	// wait while a step runs. 0 means ClusterMergeStep.
	MergeStep int64
}

// ConfigError is an Open refusal of the Config itself, before any device
// is opened: the caller's mistake, not the devices'.
type ConfigError struct{ Err error }

func (e *ConfigError) Error() string { return e.Err.Error() }
func (e *ConfigError) Unwrap() error { return e.Err }

// Set is an origin and its snapshots, opened for serving. Snapshots may
// be created and deleted while it serves (live.go).
type Set struct {
	// Origin is the engine's origin, its snapshots added.
	Origin *cow.Origin

	config  Config
	reg     *exstore.Registry
	origin  exstore.OriginIdentity // of the origin device, for the COW labels
	devOpts blockdev.Options
	shared  bool
	fence   func(blockdev.Device) blockdev.Device
	onLost  func() // a store's node lost the lockspace

	// changeMu runs one live change (create, delete) at a time.
	changeMu sync.Mutex
	// mu guards snaps and the exporter; held briefly, never across I/O.
	mu    sync.Mutex
	snaps []*served // in the order of Config.Snapshots, then of creation
	// exporter and defaultExport, once set (Export), get the exports of
	// snapshots created and deleted live.
	exporter      Exporter
	defaultExport string
	// merge is the background merge running or run last (StartMerge).
	merge *mergeJob
	// breaks, set only by tests that must catch them, break how this node
	// follows another's merge.
	breaks struct{ noMergeMode, noRefresh bool }
	// mergeStep is what one step of a clustered merge merges, at most
	// (Config.MergeStep).
	mergeStep int64

	catalog *catalog        // nil without Config.Catalog
	member  *snapset.Member // the origin's snapshot set, nil when not clustered
	front   []io.Closer     // closed first: the set's member and its lockspace
	back    []io.Closer     // closed last: the origin device
	lost    chan struct{}   // closed once a store's node loses the lockspace
	once    sync.Once
	closeMu sync.Once
}

// served is one snapshot the Set serves, with what it opened for it.
type served struct {
	spec      SnapshotSpec
	snap      *cow.Snapshot
	clustered *clusterized.Store // nil when not clustered
	label     string             // its COW label's UUID, or ""
	identity  []byte             // its identity in the snapshot set, nil when not clustered
	closing   atomic.Bool        // set when it is closed on purpose
	store     io.Closer
	dev       io.Closer
}

// close closes the store, then its device.
func (s *served) close() error {
	s.closing.Store(true)
	var errs []error
	if s.store != nil {
		errs = append(errs, s.store.Close())
	}
	if s.dev != nil {
		errs = append(errs, s.dev.Close())
	}
	return errors.Join(errs...)
}

// Snapshots returns the snapshots served now: those of Config.Snapshots in
// their order, then those created live.
func (v *Set) Snapshots() []*cow.Snapshot {
	v.mu.Lock()
	defer v.mu.Unlock()
	out := make([]*cow.Snapshot, len(v.snaps))
	for i, s := range v.snaps {
		out[i] = s.snap
	}
	return out
}

// servedSnapshots returns the served snapshots' records.
func (v *Set) servedSnapshots() []*served {
	v.mu.Lock()
	defer v.mu.Unlock()
	return slices.Clone(v.snaps)
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
	switch {
	case c.MergeStep < 0:
		return fmt.Errorf("merge step %d: want a positive size", c.MergeStep)
	case c.MergeStep > 0 && c.Cluster == nil:
		return errors.New("merge step: only with a cluster (a merge on one node runs in one go)")
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
//
// With a Catalog, a set that another node changes while this one opens
// (after it read the catalog, before it joined) is not a refusal: Open
// reads the catalog again and tries anew, up to openAttempts times.
func Open(ctx context.Context, c Config) (*Set, error) {
	for attempt := 1; ; attempt++ {
		v, err := openOnce(ctx, c)
		if err == nil || c.Catalog == "" || !errors.Is(err, snapset.ErrSetMismatch) || attempt == openAttempts {
			return v, err
		}
		// The catalog is written before a change takes effect, so it
		// lists the cluster's set by now or once the change is done.
		t := time.NewTimer(time.Duration(attempt) * openRetryPause)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, err
		case <-t.C:
		}
	}
}

// openAttempts bounds how often Open tries to join a snapshot set that
// changes under it, and openRetryPause is its first pause between tries
// (then twice that, and so on).
const (
	openAttempts   = 5
	openRetryPause = 100 * time.Millisecond
)

// openOnce is one attempt of Open.
func openOnce(ctx context.Context, c Config) (*Set, error) {
	reg := newRegistry()
	if err := c.check(reg); err != nil {
		return nil, &ConfigError{err}
	}
	v := &Set{config: c, reg: reg, lost: make(chan struct{}), mergeStep: ClusterMergeStep}
	if c.MergeStep > 0 {
		v.mergeStep = c.MergeStep
	}
	fail := func(err error) (*Set, error) {
		v.Close()
		return nil, err
	}
	v.shared = c.Cluster != nil && c.Cluster.Shared
	v.devOpts = blockdev.Options{Direct: c.Direct || v.shared, Exclusive: !v.shared}
	od, err := openDevice(c.Origin, v.devOpts, v.shared)
	if err != nil {
		return nil, fmt.Errorf("origin: %w", err)
	}
	v.back = append(v.back, od)
	v.origin = OriginIdentity(od, c.Origin, sysRoot)
	if c.OriginID != "" {
		v.origin.ID = c.OriginID
	}
	v.fence = func(d blockdev.Device) blockdev.Device { return d }
	if c.Cluster != nil {
		lost := new(atomic.Bool) // set when a store's node loses the lockspace
		v.fence = func(d blockdev.Device) blockdev.Device { return fenceShared(d, c.Cluster.ID, lost) }
		v.onLost = func() {
			lost.Store(true)
			v.once.Do(func() { close(v.lost) })
		}
	}
	v.Origin = cow.NewOrigin(v.fence(od))
	specs := c.Snapshots
	if c.Catalog != "" {
		if specs, err = v.openCatalog(c.Catalog, specs); err != nil {
			return fail(err)
		}
		if c.afterCatalog != nil {
			c.afterCatalog()
		}
	}
	var merging []*served // the snapshots whose COW says they merge
	for _, spec := range specs {
		s, st, cd, err := v.openSnapshot(ctx, spec)
		if err != nil {
			return fail(err)
		}
		if s.snap, err = v.Origin.AddSnapshot(spec.Name, st, cd, spec.Options); err != nil {
			_ = s.close()
			return fail(fmt.Errorf("snapshot %s: %w", spec.Name, err))
		}
		v.snaps = append(v.snaps, s)
		if m, err := v.noteMerge(ctx, s, st); err != nil {
			return fail(err)
		} else if m {
			merging = append(merging, s)
		}
	}
	if c.Cluster != nil {
		if err := v.joinSnapshotSet(ctx, c.Cluster, v.onLost); err != nil {
			return fail(err)
		}
	}
	if err := v.resumeMerge(ctx, merging); err != nil {
		return fail(err)
	}
	return v, nil
}

// openCatalog opens the catalog at path and returns the snapshots to
// serve: the catalog's once it holds a record, which flags may only repeat
// (a snapshot it does not list was deleted live, or the catalog is
// another origin's), flags otherwise.
func (v *Set) openCatalog(path string, flags []SnapshotSpec) ([]SnapshotSpec, error) {
	cat, err := openCatalog(path, blockdev.Options{Direct: v.devOpts.Direct, Exclusive: v.devOpts.Exclusive})
	if err != nil {
		return nil, err
	}
	v.back = append([]io.Closer{cat}, v.back...)
	v.catalog = cat
	rec, ok, err := cat.load()
	if err != nil || !ok {
		return flags, err
	}
	if err := checkCatalogOrigin(path, rec, v.origin); err != nil {
		return nil, err
	}
	listed := map[string]catalogEntry{}
	var specs []SnapshotSpec
	for _, e := range rec.Snapshots {
		listed[e.Name] = e
		specs = append(specs, e.spec())
	}
	for _, f := range flags {
		e, ok := listed[f.Name]
		switch {
		case !ok:
			return nil, &ConfigError{fmt.Errorf("snapshot %s: catalog %s does not list it (it was deleted live, or the catalog is another origin's); drop its --snapshot", f.Name, path)}
		case e.COW != f.COW:
			return nil, &ConfigError{fmt.Errorf("snapshot %s: catalog %s lists it in %s, not in %s", f.Name, path, e.COW, f.COW)}
		}
	}
	return specs, nil
}

// openSnapshot opens spec's COW device and store (clustered with a
// Cluster), checking the COW against the origin, but does not add it to
// the origin: it returns the record to serve it with, and the store and
// (fenced) COW device to add.
func (v *Set) openSnapshot(ctx context.Context, spec SnapshotSpec) (*served, exstore.Store, blockdev.Device, error) {
	oi, err := os.Stat(v.config.Origin)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("origin: %w", err)
	}
	if ci, err := os.Stat(spec.COW); err == nil && os.SameFile(oi, ci) {
		return nil, nil, nil, fmt.Errorf("snapshot %s: cow %s is the origin itself", spec.Name, spec.COW)
	}
	cd, err := openDevice(spec.COW, v.devOpts, v.shared)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("snapshot %s: %w", spec.Name, err)
	}
	s := &served{spec: spec, dev: cd}
	// Closing a retired snapshot's store leaves its membership of the
	// lockspace, which is no loss of the node's.
	onLost := func() {
		if !s.closing.Load() {
			v.onLost()
		}
	}
	st, cs, err := openStore(ctx, v.reg, cd, spec, v.config.Cluster, v.origin, onLost)
	if err != nil {
		_ = s.close()
		return nil, nil, nil, fmt.Errorf("snapshot %s: %w", spec.Name, err)
	}
	s.store, s.clustered = st, cs
	core := st
	if cs != nil {
		core = cs.Core()
	}
	s.label = labelUUID(ctx, core)
	if cs != nil {
		if s.identity, err = snapshotIdentity(ctx, spec, core); err != nil {
			_ = s.close()
			return nil, nil, nil, fmt.Errorf("snapshot %s: %w", spec.Name, err)
		}
	}
	return s, st, v.fence(cd), nil
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
			id := fmt.Appendf(nil, "name=%s cow=%s", spec.Name, l.UUID)
			if l.Merge == exstore.Merging {
				// A node that serves it as a snapshot, not merging, must
				// not join: it would write the chunks the merge holds.
				id = append(id, " merging"...)
			}
			return id, nil
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
// clusterized/snapset) with the snapshots served, following the changes
// other nodes make (follower, live.go), in its own membership of the cluster's
// lockspace, and puts the origin's writes behind its gate: a node whose
// snapshots are not the cluster's is refused (snapset.ErrSetMismatch), and
// this node writes the origin only while its set is the cluster's. onLost
// runs when the membership loses the lockspace.
func (v *Set) joinSnapshotSet(ctx context.Context, c *Cluster, onLost func()) error {
	set, err := v.currentSet()
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
	m, err := snapset.JoinFollowing(ctx, ls, c.OriginResource(), set, follower{v})
	if err != nil {
		_ = ls.Close()
		return fmt.Errorf("cluster %s: %w", c.ID, err)
	}
	// The member is released before its lockspace, both before the stores.
	v.front = append(v.front, m, ls)
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

// Close leaves the snapshot set, then closes the stores, then the
// devices. It waits for a live change under way.
func (v *Set) Close() error {
	v.stopMerge()
	v.changeMu.Lock()
	defer v.changeMu.Unlock()
	var errs []error
	v.closeMu.Do(func() {
		for _, c := range v.front {
			errs = append(errs, c.Close())
		}
		v.mu.Lock()
		snaps := v.snaps
		v.snaps = nil
		v.mu.Unlock()
		for i := len(snaps) - 1; i >= 0; i-- {
			errs = append(errs, snaps[i].close())
		}
		for _, c := range v.back {
			errs = append(errs, c.Close())
		}
	})
	return errors.Join(errs...)
}
