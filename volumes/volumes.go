package volumes

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/clustersnap/clustersnap/clusterized"
	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/exstore/cow"
	"github.com/clustersnap/clustersnap/exstore/transient"
)

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

	closers []io.Closer // stores, then devices, in closing order
}

// check refuses what no device needs to be opened to see.
func (c Config) check(reg *exstore.Registry) error {
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

// Open opens the origin and every snapshot's COW device with exclusive
// locks and each snapshot's store through the registry, without
// formatting; with a Cluster each store is clustered. The in-process lock
// engine coordinates one process only, so the exclusive locks stay with a
// cluster too.
func Open(ctx context.Context, c Config) (*Set, error) {
	reg := newRegistry()
	if err := c.check(reg); err != nil {
		return nil, &ConfigError{err}
	}
	v := &Set{}
	fail := func(err error) (*Set, error) {
		v.Close()
		return nil, err
	}
	oi, err := os.Stat(c.Origin)
	if err != nil {
		return nil, fmt.Errorf("origin: %w", err)
	}
	od, err := blockdev.Open(c.Origin, blockdev.Options{Direct: c.Direct, Exclusive: true})
	if err != nil {
		return nil, fmt.Errorf("origin: %w", err)
	}
	v.closers = append(v.closers, od)
	v.Origin = cow.NewOrigin(od)
	for _, spec := range c.Snapshots {
		if ci, err := os.Stat(spec.COW); err == nil && os.SameFile(oi, ci) {
			return fail(fmt.Errorf("snapshot %s: cow %s is the origin itself", spec.Name, spec.COW))
		}
		cd, err := blockdev.Open(spec.COW, blockdev.Options{Direct: c.Direct, Exclusive: true})
		if err != nil {
			return fail(fmt.Errorf("snapshot %s: %w", spec.Name, err))
		}
		v.closers = append([]io.Closer{cd}, v.closers...)
		st, err := openStore(ctx, reg, cd, spec, c.Cluster)
		if err != nil {
			return fail(fmt.Errorf("snapshot %s: %w", spec.Name, err))
		}
		v.closers = append([]io.Closer{st}, v.closers...)
		s, err := v.Origin.AddSnapshot(spec.Name, st, cd, spec.Options)
		if err != nil {
			return fail(fmt.Errorf("snapshot %s: %w", spec.Name, err))
		}
		v.Snapshots = append(v.Snapshots, s)
	}
	return v, nil
}

// openStore opens spec's store on the COW device cd through reg, never
// formatting. With a cluster, clusterized wraps it and opens it through reg
// again for its full reloads, so the clusterizer never knows the type.
func openStore(ctx context.Context, reg *exstore.Registry, cd blockdev.Device, spec SnapshotSpec, cluster *Cluster) (exstore.Store, error) {
	args := exstore.Args{ChunkSectors: spec.ChunkSectors, NoFormat: true}
	if cluster == nil {
		return reg.Open(ctx, spec.storeType(), cd, args)
	}
	open := func(ctx context.Context, dev blockdev.Device) (exstore.Store, error) {
		return reg.Open(ctx, spec.storeType(), dev, args)
	}
	cs, err := clusterized.Open(ctx, cd, open, cluster.Engine, cluster.Resource(spec.Name), clusterized.Options{})
	if err != nil {
		return nil, err
	}
	return cs.Exstore(), nil // with lazy commits, as the bare store has them
}

// Close closes the stores, then the devices.
func (v *Set) Close() error {
	var errs []error
	for _, c := range v.closers {
		errs = append(errs, c.Close())
	}
	return errors.Join(errs...)
}
