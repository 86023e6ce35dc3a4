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

// TestLiveResult: a result line is read only once its marker is there,
// and the last one counts.
func TestLiveResult(t *testing.T) {
	console := "[ 1.0] boot\n" +
		"created snapshot live in /dev/vde rc=0 " + liveMarker(liveCreate, 1) + "\n" +
		"list: dial: no such file rc=1 " + liveMarker(liveList, 2) + "\n" +
		`[{"name": "snap", "note": "rc=7"}] rc=0 ` + liveMarker(liveList, 2) + "\n" +
		"snapd rc=0 " + liveMarker(liveStop, 3) + "\n" +
		"half a line rc=0 @@live-delete node=2"
	out, rc, ok := liveResult(console, liveCreate, 1)
	assert.True(t, ok)
	assert.Equal(t, 0, rc)
	assert.Equal(t, "created snapshot live in /dev/vde", out)
	out, rc, ok = liveResult(console, liveList, 2)
	assert.True(t, ok)
	assert.Equal(t, 0, rc)
	assert.Equal(t, `[{"name": "snap", "note": "rc=7"}]`, out)
	out, rc, ok = liveResult(console, liveStop, 3)
	assert.True(t, ok)
	assert.Equal(t, 0, rc)
	assert.Equal(t, "snapd", out)
	_, _, ok = liveResult(console, liveDelete, 2)
	assert.False(t, ok, "a line without its whole marker")
	_, _, ok = liveResult(console, liveCreate, 2)
	assert.False(t, ok, "node 2 printed no create result")
	_, rc, ok = liveResult("list rc=1 "+liveMarker(liveList, 1), liveList, 1)
	assert.True(t, ok)
	assert.Equal(t, 1, rc)
}
