package nbd

import (
	"context"
	"encoding/binary"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// listExports sends LIST and returns the names the server lists.
func (rc *rawClient) listExports() []string {
	rc.t.Helper()
	rc.sendOption(optList, nil)
	var names []string
	for {
		typ, data := rc.readOptionReply(optList)
		if typ == repAck {
			return names
		}
		require.Equal(rc.t, repServer, typ)
		n := binary.BigEndian.Uint32(data)
		names = append(names, string(data[4:4+n]))
	}
}

// Exports added while the server serves are listed and selectable at once;
// removed ones are neither, and adding a name twice or removing an unknown
// one fails without changing anything.
func TestAddAndRemoveExports(t *testing.T) {
	srv := NewServer([]Export{{Name: "origin", Backend: newMemBackend(1 << 20)}}, Options{})
	require.NoError(t, srv.AddExport(Export{Name: "snap1", Backend: newMemBackend(1 << 20)}))
	require.Error(t, srv.AddExport(Export{Name: "snap1", Backend: newMemBackend(1 << 20)}), "a name served already")
	require.Error(t, srv.AddExport(Export{Name: "nobackend"}), "no backend")

	rc := dialRaw(t, srv)
	rc.sendFlags(clientFlagFixedNewstyle | clientFlagNoZeroes)
	assert.Equal(t, []string{"origin", "snap1"}, rc.listExports())
	require.NoError(t, srv.RemoveExport(t.Context(), "snap1"))
	assert.Equal(t, []string{"origin"}, rc.listExports())
	require.Error(t, srv.RemoveExport(t.Context(), "snap1"), "removed already")
	rc.sendOption(optGo, infoRequest("snap1"))
	typ, _ := rc.readOptionReply(optGo)
	assert.Equal(t, repErrUnknown, typ, "a removed export cannot be selected")
	size, _ := rc.goExport("origin")
	assert.Equal(t, uint64(1<<20), size)
}

// RemoveExport lets the requests in flight on the export finish and be
// answered, closes the connections using it, and returns only then: the
// backend sees no I/O after it returns. Connections to other exports go on.
func TestRemoveExportDrainsItsConnections(t *testing.T) {
	const gated = 8192
	snap := newGatedBackend(1<<20, gated)
	srv := NewServer([]Export{
		{Name: "origin", Backend: newMemBackend(1 << 20)},
		{Name: "snap", Backend: snap},
	}, Options{})
	user := transmitting(t, srv, "snap", false)
	other := transmitting(t, srv, "origin", false)

	user.sendRequest(0, cmdRead, 1, gated, 4096, nil)
	<-snap.entered
	removed := make(chan error, 1)
	go func() { removed <- srv.RemoveExport(t.Context(), "snap") }()
	select {
	case err := <-removed:
		t.Fatalf("RemoveExport returned with a request in flight: %v", err)
	case <-time.After(50 * time.Millisecond):
		// Not a synchronisation: a check that it did not return early.
	}
	close(snap.gate)
	errno, cookie := user.readSimpleReply()
	require.Equal(t, uint32(0), errno, "the request in flight is answered")
	require.Equal(t, uint64(1), cookie)
	user.read(make([]byte, 4096))
	require.NoError(t, <-removed)
	user.requireClosed()

	other.sendRequest(0, cmdRead, 2, 0, 512, nil)
	errno, _ = other.readSimpleReply()
	require.Equal(t, uint32(0), errno, "the origin's connection goes on")
	other.read(make([]byte, 512))
}

// A removal whose connections do not finish in time closes them hard once
// ctx ends, and still returns only after they closed.
func TestRemoveExportDeadline(t *testing.T) {
	const gated = 0
	snap := newGatedBackend(1<<20, gated)
	srv := NewServer([]Export{{Name: "snap", Backend: snap}}, Options{})
	user := transmitting(t, srv, "snap", false)
	user.sendRequest(0, cmdRead, 1, gated, 4096, nil)
	<-snap.entered
	ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
	defer cancel()
	err := srv.RemoveExport(ctx, "snap")
	require.ErrorIs(t, err, context.DeadlineExceeded)
	snap.mu.Lock()
	running := snap.running
	snap.mu.Unlock()
	assert.Zero(t, running, "no request of the export still runs")
}
