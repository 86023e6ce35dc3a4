package clusterized

import (
	"context"
	"fmt"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/lockc"
)

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
