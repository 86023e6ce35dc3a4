package cluster

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestLastStatus: the figures come from the last complete status line.
func TestLastStatus(t *testing.T) {
	console := "[ 1.0] boot\n" +
		`{"cluster": {"node_id": 2}, "snapshots": [{"name": "snap", "cluster": {"up_conversions": 5}}]} ` + statusMarker(2, 1) + "\n" +
		`{"cluster": {"node_id": 2}, "snapshots": [{"name": "snap", "cluster": {"up_conversions": 9}}]} ` + statusMarker(2, 2) + "\n" +
		"[ 9.0] later\n"
	st, ok := lastStatus(console, 2)
	require.True(t, ok)
	require.Len(t, st.Snapshots, 1)
	assert.Equal(t, uint64(9), st.Snapshots[0].Cluster.UpConverts)
	_, ok = lastStatus(console, 1)
	assert.False(t, ok, "node 1 printed nothing")
}
