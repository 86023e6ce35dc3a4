package clusterized

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync/atomic"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/lockc"
	"github.com/clustersnap/clustersnap/persistent"
)

// TypeName is the registry name of the clustered persistent store.
const TypeName = "clusterized_persistent"

// Register adds the "clusterized_persistent" type to r: a persistent store
// shared by the nodes of a cluster, whose lock engine is engine. Its Open
// takes the cluster id as Params[0] and returns a *LazyStore (Store.Exstore);
// it never formats the COW device (a clustered node must not: format it
// once with the plain persistent type).
func Register(r *exstore.Registry, engine lockc.Engine) error {
	if engine == nil {
		return fmt.Errorf("exstore type %s: a lock engine is required", TypeName)
	}
	return r.Register(exstore.Type{
		Name:  TypeName,
		Usage: "<cluster-id>: the id the nodes sharing the COW device agree on",
		Open: func(ctx context.Context, cow blockdev.Device, args exstore.Args) (exstore.Store, error) {
			if len(args.Params) != 1 || args.Params[0] == "" {
				return nil, fmt.Errorf("cow %s: %s takes exactly one parameter, the cluster id; got %q", cow.Name(), TypeName, args.Params)
			}
			s, err := OpenPersistent(ctx, cow, engine, args.Params[0], PersistentOptions{ChunkSectors: args.ChunkSectors})
			if err != nil {
				return nil, err
			}
			return s.Exstore(), nil
		},
	})
}

// PersistentOptions tune OpenPersistent.
type PersistentOptions struct {
	// ChunkSectors is the chunk size asked for; the COW header's wins.
	ChunkSectors uint32
	// Logger receives the persistent store's warnings; nil means
	// slog.Default().
	Logger *slog.Logger
	// Lockspace is as in Options.
	Lockspace string
}

// OpenPersistent opens the persistent store on cow (NoFormat) for cluster
// clusterID and wraps it, through Open.
func OpenPersistent(ctx context.Context, cow blockdev.Device, engine lockc.Engine, clusterID string, opts PersistentOptions) (*Store, error) {
	open := func(ctx context.Context, dev blockdev.Device) (exstore.Store, error) {
		return persistent.Open(ctx, dev, persistent.Options{ChunkSectors: opts.ChunkSectors, NoFormat: true, Logger: opts.Logger})
	}
	return Open(ctx, cow, open, engine, clusterID, Options{Lockspace: opts.Lockspace})
}

// OpenFunc opens a core store on dev, without formatting it: a clustered
// node never formats a shared COW device.
type OpenFunc func(ctx context.Context, dev blockdev.Device) (exstore.Store, error)

// Open opens the core store on cow through open, for cluster clusterID, and
// wraps it (New, with a Reopen that calls open again for full reloads;
// opts.Reopen is ignored). The core sees cow through a fence that refuses
// every write once the node has lost the lockspace.
func Open(ctx context.Context, cow blockdev.Device, open OpenFunc, engine lockc.Engine, clusterID string, opts Options) (*Store, error) {
	fenced := &fencedDevice{Device: cow, cluster: clusterID}
	reopen := func(ctx context.Context) (exstore.Store, error) { return open(ctx, fenced) }
	core, err := reopen(ctx)
	if err != nil {
		return nil, fmt.Errorf("cluster %s: %w", clusterID, err)
	}
	opts.Reopen = reopen
	s, err := New(ctx, core, engine, clusterID, opts)
	if err != nil {
		_ = core.Close()
		return nil, err
	}
	lost := s.Lost()
	fenced.lost.Store(&lost)
	return s, nil
}

// ErrFenced is wrapped by the writes a fenced device refuses.
var ErrFenced = errors.New("write refused: this node lost its cluster lock")

// fencedDevice passes I/O to Device, except writes once the lockspace is
// lost. It is the store's last line against writing shared metadata without
// the lock; the window between the loss and a write already past the check
// is what real fencing (the DLM waits for the dead node to be fenced)
// closes.
type fencedDevice struct {
	blockdev.Device
	cluster string
	lost    atomic.Pointer[<-chan struct{}]
}

// check fails once the lockspace is lost.
func (d *fencedDevice) check() error {
	p := d.lost.Load()
	if p == nil {
		return nil
	}
	select {
	case <-*p:
		return fmt.Errorf("cluster %s: cow %s: %w", d.cluster, d.Device.Name(), ErrFenced)
	default:
		return nil
	}
}

// WriteAt implements blockdev.Device.
func (d *fencedDevice) WriteAt(p []byte, off int64) (int, error) {
	if err := d.check(); err != nil {
		return 0, err
	}
	return d.Device.WriteAt(p, off)
}

// WriteAtSync implements blockdev.Device.
func (d *fencedDevice) WriteAtSync(p []byte, off int64) (int, error) {
	if err := d.check(); err != nil {
		return 0, err
	}
	return d.Device.WriteAtSync(p, off)
}

// Close does not close the underlying device: the store does not own it.
func (d *fencedDevice) Close() error { return nil }
