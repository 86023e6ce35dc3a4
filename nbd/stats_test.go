package nbd

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// statsOf returns the counters of export name, failing if it is not listed.
func statsOf(t *testing.T, srv *Server, name string) ExportStats {
	t.Helper()
	for _, st := range srv.Stats() {
		if st.Name == name {
			return st
		}
	}
	t.Fatalf("export %q not in Stats", name)
	return ExportStats{}
}

// Every request answered is counted once, under its command or under
// Errors, before its reply goes out; connections are counted while open and
// in total, and the counts of a connection that ended stay.
func TestStatsCountRequestsExactly(t *testing.T) {
	srv := NewServer([]Export{
		{Name: "b", Backend: newMemBackend(1 << 20)},
		{Name: "a", Backend: newMemBackend(1 << 20)},
		{Name: "ro", Backend: newMemBackend(1 << 20), ReadOnly: true},
	}, Options{})
	assert.Equal(t, []ExportStats{{Name: "a"}, {Name: "b"}, {Name: "ro"}}, srv.Stats(), "sorted by name, all zero")

	rc := structuredClient(t, srv)
	rc.sendOption(optSetMetaContext, metaRequest("a", metaContextBaseAllocation))
	require.Len(t, rc.metaReplies(optSetMetaContext), 1)
	rc.goExport("a")
	other := transmitting(t, srv, "a", false)
	ro := transmitting(t, srv, "ro", false)

	rc.sendRequest(0, cmdWrite, 1, 0, 1000, make([]byte, 1000))
	errno, _ := rc.readSimpleReply()
	require.Zero(t, errno)
	rc.sendRequest(cmdFlagFUA, cmdWrite, 2, 8192, 24, make([]byte, 24))
	errno, _ = rc.readSimpleReply()
	require.Zero(t, errno)
	rc.sendRequest(0, cmdRead, 3, 0, 4096, nil)
	require.Equal(t, replyTypeOffsetData, rc.readChunk().typ)
	rc.sendRequest(0, cmdFlush, 4, 0, 0, nil)
	errno, _ = rc.readSimpleReply()
	require.Zero(t, errno)
	rc.sendRequest(0, cmdTrim, 5, 0, 4096, nil)
	errno, _ = rc.readSimpleReply()
	require.Zero(t, errno)
	rc.sendRequest(0, cmdWriteZeroes, 6, 0, 8192, nil)
	errno, _ = rc.readSimpleReply()
	require.Zero(t, errno)
	rc.sendRequest(0, cmdBlockStatus, 7, 0, 8192, nil)
	rc.blockStatusReply(7)
	rc.sendRequest(0, cmdCache, 8, 0, 4096, nil)
	errno, _ = rc.readSimpleReply()
	require.Zero(t, errno)
	// Refused: a read and a write past the end, an unknown command.
	rc.sendRequest(0, cmdRead, 9, 1<<20, 512, nil)
	require.Equal(t, errInval, rc.errorChunk(9))
	rc.sendRequest(0, cmdWrite, 10, 1<<20-256, 512, make([]byte, 512))
	errno, _ = rc.readSimpleReply()
	require.Equal(t, errNoSpc, errno)
	rc.sendRequest(0, 77, 11, 0, 0, nil)
	errno, _ = rc.readSimpleReply()
	require.Equal(t, errInval, errno)

	other.sendRequest(0, cmdRead, 1, 512, 512, nil)
	errno, _ = other.readSimpleReply()
	require.Zero(t, errno)
	other.read(make([]byte, 512))
	ro.sendRequest(0, cmdWrite, 1, 0, 512, make([]byte, 512))
	errno, _ = ro.readSimpleReply()
	require.Equal(t, errPerm, errno)

	want := ExportStats{
		Name:            "a",
		ConnectionsOpen: 2, ConnectionsTotal: 2,
		Reads: 2, ReadBytes: 4096 + 512,
		Writes: 2, WrittenBytes: 1024,
		Flushes: 1, Trims: 1, Zeroes: 1, BlockStatus: 1,
		Errors: 3,
	}
	assert.Equal(t, want, statsOf(t, srv, "a"))
	assert.Equal(t, ExportStats{Name: "ro", ConnectionsOpen: 1, ConnectionsTotal: 1, Errors: 1}, statsOf(t, srv, "ro"))
	assert.Equal(t, ExportStats{Name: "b"}, statsOf(t, srv, "b"))

	// The counts of a connection that ended stay with its export.
	rc.sendRequest(0, cmdDisc, 12, 0, 0, nil)
	rc.requireClosed()
	want.ConnectionsOpen = 1
	assert.Equal(t, want, statsOf(t, srv, "a"))
	other.sendRequest(0, cmdDisc, 2, 0, 0, nil)
	other.requireClosed()
	want.ConnectionsOpen = 0
	assert.Equal(t, want, statsOf(t, srv, "a"))

	// A connection that never selected an export counts nowhere; one that
	// selected it by EXPORT_NAME counts.
	lister := dialRaw(t, srv)
	lister.sendFlags(clientFlagFixedNewstyle | clientFlagNoZeroes)
	lister.listExports()
	old := dialRaw(t, srv)
	old.sendFlags(clientFlagFixedNewstyle | clientFlagNoZeroes)
	old.sendOption(optExportName, []byte("a"))
	old.read(make([]byte, 10))
	want.ConnectionsOpen, want.ConnectionsTotal = 1, 3
	assert.Equal(t, want, statsOf(t, srv, "a"))
}

// Exports added while serving are counted from zero; removed ones leave
// Stats, and one added again under the same name starts from zero.
func TestStatsFollowAddAndRemove(t *testing.T) {
	srv := NewServer([]Export{{Name: "origin", Backend: newMemBackend(1 << 20)}}, Options{})
	require.NoError(t, srv.AddExport(Export{Name: "snap", Backend: newMemBackend(1 << 20)}))
	rc := transmitting(t, srv, "snap", false)
	rc.sendRequest(0, cmdRead, 1, 0, 512, nil)
	errno, _ := rc.readSimpleReply()
	require.Zero(t, errno)
	rc.read(make([]byte, 512))
	assert.Equal(t, []ExportStats{
		{Name: "origin"},
		{Name: "snap", ConnectionsOpen: 1, ConnectionsTotal: 1, Reads: 1, ReadBytes: 512},
	}, srv.Stats())

	require.NoError(t, srv.RemoveExport(t.Context(), "snap"))
	rc.requireClosed()
	assert.Equal(t, []ExportStats{{Name: "origin"}}, srv.Stats())
	require.NoError(t, srv.AddExport(Export{Name: "snap", Backend: newMemBackend(1 << 20)}))
	assert.Equal(t, []ExportStats{{Name: "origin"}, {Name: "snap"}}, srv.Stats())
}
