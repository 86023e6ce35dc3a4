package clustertest

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// ahead reports whether p would hold node id back now.
func ahead(p *pacer, id uint32) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	a, _ := p.aheadLocked(id)
	return a
}

// waitDone runs p.wait(id) and returns a channel that gets its result.
func waitDone(p *pacer, id uint32) <-chan error {
	done := make(chan error, 1)
	go func() { done <- p.wait(id) }()
	return done
}

func TestPacerHoldsTheNodeAhead(t *testing.T) {
	p := newPacer(2)
	p.add(1)
	p.add(2)
	for range 3 {
		require.False(t, ahead(p, 1))
		require.NoError(t, p.wait(1))
		p.did(1)
	}
	require.True(t, ahead(p, 1), "node 1, 3 operations ahead with a lead of 2")
	assert.False(t, ahead(p, 2), "the node behind")
	done := waitDone(p, 1)
	p.did(2)
	require.NoError(t, <-done, "node 1, 2 ahead once node 2 did one")
}

func TestPacerReleasesOnStopAndExit(t *testing.T) {
	p := newPacer(0)
	p.add(1)
	p.add(2)
	for range 10 {
		p.did(1)
	}
	assert.False(t, ahead(p, 1), "a lead of 0 paces nothing")

	p = newPacer(1)
	p.add(1)
	p.add(2)
	p.add(3)
	p.did(1)
	p.did(1)
	require.True(t, ahead(p, 1), "node 1, 2 ahead of nodes 2 and 3")
	done := waitDone(p, 1)
	p.stop(2) // crashed
	require.True(t, ahead(p, 1), "node 1, still 2 ahead of node 3")
	p.exit(3) // its only worker returned
	assert.False(t, ahead(p, 1), "no other node running")
	assert.NoError(t, <-done)
}
