package clusterized_test

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/clusterized"
	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev/faultdev"
	"github.com/clustersnap/clustersnap/lockc/inproc"
)

// add prepares and commits an exception for old.
func add(t testing.TB, s exstore.Store, old exstore.Chunk) exstore.Exception {
	t.Helper()
	e, err := s.Prepare(context.Background(), old)
	require.NoError(t, err, "prepare %d", old)
	require.NoError(t, s.Commit(context.Background(), e), "commit %v", e)
	return e
}

// miss looks up a chunk that has no exception and releases the answer.
func miss(t testing.TB, s exstore.Store, old exstore.Chunk) {
	t.Helper()
	_, found, release, err := s.Lookup(context.Background(), old)
	release()
	require.NoError(t, err)
	require.False(t, found, "chunk %d", old)
}

func walkMap(s exstore.Store) map[exstore.Chunk]exstore.Chunk {
	m := map[exstore.Chunk]exstore.Chunk{}
	s.Walk(func(e exstore.Exception) bool {
		m[e.Old] = e.New
		return true
	})
	return m
}

// The counter saves metadata reads: a miss reads nothing while nothing
// changed, even when the lock went to another node and came back; after k
// new exceptions the other node reads on the order of k/E areas.
func TestCounterSavesMetadataReads(t *testing.T) {
	const (
		chunkSectors = 8
		perArea      = chunkSectors * exstore.SectorSize / 16 // E = 256
		before       = 1500
		k            = 600
		absent       = exstore.Chunk(1 << 40)
	)
	dev := faultdev.New("cow", 64<<20)
	formatCOW(t, dev, chunkSectors)
	cluster := inproc.NewCluster()
	a := openClustered(t, dev, cluster.Node(1), "count")
	t.Cleanup(func() { assert.NoError(t, a.Close()) })
	b := openClustered(t, dev, cluster.Node(2), "count")
	t.Cleanup(func() { assert.NoError(t, b.Close()) })

	for i := range before {
		add(t, a, exstore.Chunk(2*i))
	}
	miss(t, b, absent) // B catches up once
	require.Equal(t, uint64(before), b.Usage().Exceptions)

	dev.ResetStats()
	up := b.Stats().UpConverts
	for i := range 1000 {
		miss(t, b, absent+exstore.Chunk(i))
	}
	assert.Zero(t, dev.Stats().Reads, "misses under a cached lock")
	assert.Equal(t, up, b.Stats().UpConverts, "the lock stayed cached")

	// A takes EX and changes nothing: B gets the lock back and reads nothing.
	_, err := a.Prepare(context.Background(), 0)
	require.ErrorIs(t, err, exstore.ErrExists)
	dev.ResetStats()
	refreshes := b.Stats().Refreshes
	miss(t, b, absent)
	assert.Equal(t, up+1, b.Stats().UpConverts, "B had to get its lock back")
	assert.Zero(t, dev.Stats().Reads, "nothing changed, so nothing is read")
	assert.Equal(t, refreshes, b.Stats().Refreshes)

	// k new exceptions: a refresh on the order of k/E area reads.
	for i := range k {
		add(t, a, exstore.Chunk(1_000_000+i))
	}
	dev.ResetStats()
	miss(t, b, absent)
	reads := dev.Stats().Reads
	assert.LessOrEqual(t, reads, uint64(2+k/perArea+2), "refresh after %d new exceptions (E=%d); a reload reads %d areas", k, perArea, (before+k)/perArea+1)
	assert.Positive(t, reads)
	assert.Equal(t, refreshes+1, b.Stats().Refreshes)
	assert.Zero(t, b.Stats().Reloads)
	assert.Equal(t, walkMap(a), walkMap(b))
	assert.Equal(t, a.Usage(), b.Usage())

	// And B allocates after A's last chunk.
	e := add(t, b, 5)
	for old, nw := range walkMap(a) {
		assert.NotEqual(t, nw, e.New, "chunk of %d handed out again", old)
	}
}

var _ exstore.Store = (*clusterized.Store)(nil)
