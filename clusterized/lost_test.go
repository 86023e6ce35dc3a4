package clusterized_test

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/clusterized"
	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/exstore/blockdev/faultdev"
	"github.com/clustersnap/clustersnap/lockc"
	"github.com/clustersnap/clustersnap/lockc/inproc"
	"github.com/clustersnap/clustersnap/persistent"
)

// failingCore is a persistent core whose allocations, once failing is
// set, first run onFail (which takes the node out of the cluster) and then
// fail as a core does that invalidated itself on a fenced write.
type failingCore struct {
	*persistent.Store
	failing atomic.Bool
	onFail  func()
}

func (c *failingCore) fail() error {
	c.onFail()
	return fmt.Errorf("commit: write refused by the fence: %w", exstore.ErrInvalid)
}

func (c *failingCore) Prepare(ctx context.Context, old exstore.Chunk) (exstore.Exception, error) {
	if c.failing.Load() {
		return exstore.Exception{}, c.fail()
	}
	return c.Store.Prepare(ctx, old)
}

func (c *failingCore) PrepareIfUnchanged(ctx context.Context, old exstore.Chunk, word *atomic.Uint64, want uint64) (exstore.Exception, error) {
	if c.failing.Load() {
		return exstore.Exception{}, c.fail()
	}
	return c.Store.PrepareIfUnchanged(ctx, old, word, want)
}

// A node whose core fails an allocation because the node just lost the
// lockspace reports the loss, not an invalid snapshot: the COW engine lets
// an origin write go ahead past an invalid snapshot, which on a node cut
// off from the cluster would overwrite a chunk the others' snapshot still
// needs.
func TestPrepareReportsTheLossOverTheCoresFailure(t *testing.T) {
	ctx := context.Background()
	dev := faultdev.New("cow", 1<<20)
	formatCOW(t, dev, 8)
	cluster := inproc.NewCluster()
	core := &failingCore{}
	open := func(ctx context.Context, dev blockdev.Device) (exstore.Store, error) {
		s, err := persistent.Open(ctx, dev, persistent.Options{NoFormat: true, Logger: quietLogger()})
		if err != nil {
			return nil, err
		}
		core.Store = s
		return core, nil
	}
	cs, err := clusterized.Open(ctx, dev, open, cluster.Node(1), "lost", clusterized.Options{})
	require.NoError(t, err)
	defer cs.Close()
	core.onFail = func() { cluster.Crash(1) }
	s := cs.Exstore()
	add(t, s, 1) // the node holds EX, cached: the next Prepare takes the fast path

	core.failing.Store(true)
	_, err = s.Prepare(ctx, 2)
	require.Error(t, err)
	assert.ErrorIs(t, err, lockc.ErrLost)
	assert.NotErrorIs(t, err, exstore.ErrInvalid, "an invalid snapshot would let origin writes go ahead uncopied")
	assert.ErrorContains(t, err, "lost")
}
