package clustertest

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/lockc"
	"github.com/clustersnap/clustersnap/lockc/inproc"
)

// The stores of the suite get locks without tokens, and lockspaces with
// the loss capabilities of the engine's, on an engine that has tokens and
// both capabilities.
func TestWithoutTokensHidesTokensOnly(t *testing.T) {
	ctx := context.Background()
	cluster := inproc.NewCluster()
	raw, err := cluster.Node(1).Open(ctx, "ls")
	require.NoError(t, err)
	defer raw.Close()
	rawLock, err := raw.Lock(ctx, []byte("r"), lockc.NL)
	require.NoError(t, err)
	_, tokens := rawLock.(lockc.Tokener)
	require.True(t, tokens, "the in-process engine offers tokens: the check below could fail")

	ls, err := withoutTokens(cluster, 2).Open(ctx, "ls")
	require.NoError(t, err)
	defer ls.Close()
	_, notifier := ls.(lockc.LostNotifier)
	_, checker := ls.(lockc.LostChecker)
	assert.True(t, notifier, "LostNotifier kept")
	assert.True(t, checker, "LostChecker kept")
	l, err := ls.Lock(ctx, []byte("r"), lockc.EX)
	require.NoError(t, err)
	_, tokens = l.(lockc.Tokener)
	assert.False(t, tokens, "the lock offers a Tokener")
	require.NoError(t, l.Convert(ctx, lockc.NL))
	require.NoError(t, l.Unlock(ctx))
}
