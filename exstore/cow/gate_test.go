package cow

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// recordingGate admits or refuses, and records what the copies of the
// changes it admitted saw: whether each change was inside when its origin
// I/O happened is checked through the snapshot's model below.
type recordingGate struct {
	mu      sync.Mutex
	refuse  error
	entered int
	inside  int
}

var errGateShut = errors.New("gate shut")

func (g *recordingGate) Enter(ctx context.Context) (func(), error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.refuse != nil {
		return nil, g.refuse
	}
	g.entered++
	g.inside++
	return func() {
		g.mu.Lock()
		g.inside--
		g.mu.Unlock()
	}, nil
}

func (g *recordingGate) counts() (entered, inside int) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.entered, g.inside
}

// Every origin change passes the gate once and leaves it; snapshot writes,
// reads and flushes do not enter; a refused change touches neither the
// origin nor any COW.
func TestOriginGate(t *testing.T) {
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(18, 1))
	const size = 256 << 10
	dev := newOriginDev(rng, size)
	model := bytes.Clone(dev.Bytes())
	o := NewOrigin(dev)
	target := addSnapshot(t, o, "target", 8, size*2, SnapshotOptions{}, model)
	other := addSnapshot(t, o, "other", 16, size*2, SnapshotOptions{}, model)
	g := &recordingGate{}
	o.SetGate(g)

	changes := []struct {
		name string
		do   func() error
	}{
		{"write", func() error { return o.WriteAt(ctx, bytes.Repeat([]byte{1}, 4096), 0, false) }},
		{"write with fua", func() error { return o.WriteAt(ctx, bytes.Repeat([]byte{2}, 4096), 8192, true) }},
		{"trim", func() error { return o.Trim(ctx, 16384, 8192, false) }},
		{"zeroes", func() error { return o.WriteZeroes(ctx, 32768, 8192, true, false) }},
	}
	for i, c := range changes {
		require.NoError(t, c.do(), c.name)
		entered, inside := g.counts()
		assert.Equal(t, i+1, entered, "%s enters the gate once", c.name)
		assert.Zero(t, inside, "%s leaves the gate", c.name)
	}
	entered, _ := g.counts()
	require.NoError(t, target.snap.WriteAt(ctx, bytes.Repeat([]byte{3}, 4096), 65536, false))
	require.NoError(t, o.Flush(ctx))
	readAll(t, o)
	readAll(t, target.snap)
	after, _ := g.counts()
	assert.Equal(t, entered, after, "snapshot writes, reads and flushes do not enter")

	// Refused: nothing changes anywhere.
	g.mu.Lock()
	g.refuse = errGateShut
	g.mu.Unlock()
	originBefore, targetBefore, otherBefore := readAll(t, o), readAll(t, target.snap), readAll(t, other.snap)
	usage := target.store.Usage().Exceptions
	for _, c := range []struct {
		name string
		err  error
	}{
		{"write", o.WriteAt(ctx, bytes.Repeat([]byte{4}, 4096), 131072, false)},
		{"trim", o.Trim(ctx, 131072, 8192, false)},
		{"zeroes", o.WriteZeroes(ctx, 131072, 8192, false, false)},
		{"merge", o.Merge(ctx, target.snap, nil)},
	} {
		assert.ErrorIs(t, c.err, errGateShut, c.name)
	}
	requireSame(t, originBefore, readAll(t, o), "the origin after refused changes")
	requireSame(t, targetBefore, readAll(t, target.snap), "the target snapshot")
	requireSame(t, otherBefore, readAll(t, other.snap), "the other snapshot")
	assert.Equal(t, usage, target.store.Usage().Exceptions, "no copy was made")

	// A merge passes the gate once per run.
	g.mu.Lock()
	g.refuse = nil
	g.mu.Unlock()
	before, _ := g.counts()
	require.NoError(t, o.Merge(ctx, target.snap, nil))
	entered, inside := g.counts()
	assert.Greater(t, entered, before, "the merge's runs enter the gate")
	assert.Zero(t, inside)
	requireSame(t, targetBefore, readAll(t, o), "the origin after the merge")
}
