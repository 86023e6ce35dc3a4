package nbd

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// cowMemBackend is a memBackend that plays a snapshot: pages written after
// snapshot() was called are "in the COW store", so its exception map differs
// from its allocation map.
type cowMemBackend struct {
	*memBackend
	tracking bool
	inCOW    []bool
}

func newCOWMemBackend(size int64) *cowMemBackend {
	m := newMemBackend(size)
	return &cowMemBackend{memBackend: m, inCOW: make([]bool, len(m.allocated))}
}

// snapshot starts recording writes as exceptions.
func (b *cowMemBackend) snapshot() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.tracking = true
}

func (b *cowMemBackend) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	if err := b.memBackend.WriteAt(ctx, p, off, fua); err != nil {
		return err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.tracking {
		for pg := off / pageSize; pg*pageSize < off+int64(len(p)); pg++ {
			b.inCOW[pg] = true
		}
	}
	return nil
}

func (b *cowMemBackend) COWExtents(_ context.Context, off, length int64) ([]COWExtent, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []COWExtent
	for pos := off; pos < off+length; {
		state := b.inCOW[pos/pageSize]
		end := (pos/pageSize + 1) * pageSize
		for end < int64(len(b.data)) && b.inCOW[end/pageSize] == state {
			end += pageSize
		}
		end = min(end, int64(len(b.data)))
		out = append(out, COWExtent{Length: end - pos, InCOW: state})
		pos = end
	}
	return out, nil
}

// metaReplies collects the REP_META_CONTEXT replies to opt up to the ACK, as
// name → id.
func (rc *rawClient) metaReplies(opt uint32) map[string]uint32 {
	rc.t.Helper()
	got := map[string]uint32{}
	for {
		typ, data := rc.readOptionReply(opt)
		if typ == repAck {
			return got
		}
		require.Equal(rc.t, repMetaContext, typ)
		got[string(data[4:])] = binary.BigEndian.Uint32(data)
	}
}

// blockStatusExtents decodes a BLOCK_STATUS chunk into its context id and
// (length, flags) pairs.
func blockStatusExtents(t *testing.T, c chunk) (uint32, [][2]uint32) {
	t.Helper()
	require.Equal(t, replyTypeBlockStatus, c.typ)
	require.Zero(t, (len(c.payload)-4)%8)
	var extents [][2]uint32
	for i := 4; i < len(c.payload); i += 8 {
		extents = append(extents, [2]uint32{binary.BigEndian.Uint32(c.payload[i:]), binary.BigEndian.Uint32(c.payload[i+4:])})
	}
	return binary.BigEndian.Uint32(c.payload), extents
}

func TestMetaContextExceptions(t *testing.T) {
	cow := newCOWMemBackend(1 << 20)
	ctx := context.Background()
	require.NoError(t, cow.WriteAt(ctx, make([]byte, 2*pageSize), 0, false))
	cow.snapshot()
	require.NoError(t, cow.WriteAt(ctx, []byte("x"), pageSize, false))
	srv := NewServer([]Export{
		{Name: "snap", Backend: cow},
		{Name: "plain", Backend: newMemBackend(1 << 20)},
	}, Options{})

	rc := dialRaw(t, srv)
	rc.sendFlags(clientFlagFixedNewstyle | clientFlagNoZeroes)
	rc.sendOption(optStructuredReply, nil)
	typ, _ := rc.readOptionReply(optStructuredReply)
	require.Equal(t, repAck, typ)

	listings := []struct {
		export  string
		queries []string
		want    []string
	}{
		{"snap", nil, []string{metaContextBaseAllocation, MetaContextExceptions}},
		{"snap", []string{"clustersnap:"}, []string{MetaContextExceptions}},
		{"snap", []string{"base:"}, []string{metaContextBaseAllocation}},
		{"snap", []string{MetaContextExceptions, "qemu:allocation-depth"}, []string{MetaContextExceptions}},
		{"plain", nil, []string{metaContextBaseAllocation}},
		{"plain", []string{"clustersnap:"}, nil},
	}
	for _, l := range listings {
		rc.sendOption(optListMetaContext, metaRequest(l.export, l.queries...))
		got := rc.metaReplies(optListMetaContext)
		var names []string
		for name, id := range got {
			names = append(names, name)
			assert.Zero(t, id, "LIST gives no ids")
		}
		assert.ElementsMatch(t, l.want, names, "%s %q", l.export, l.queries)
	}

	// SET on an export without the map selects only what it has.
	rc.sendOption(optSetMetaContext, metaRequest("plain", MetaContextExceptions, metaContextBaseAllocation))
	assert.Equal(t, map[string]uint32{metaContextBaseAllocation: metaContextBaseAllocationID}, rc.metaReplies(optSetMetaContext))
	// A bare namespace selects nothing in SET.
	rc.sendOption(optSetMetaContext, metaRequest("snap", "clustersnap:"))
	assert.Empty(t, rc.metaReplies(optSetMetaContext))

	rc.sendOption(optSetMetaContext, metaRequest("snap", MetaContextExceptions, metaContextBaseAllocation))
	ids := rc.metaReplies(optSetMetaContext)
	require.Len(t, ids, 2)
	assert.NotEqual(t, ids[metaContextBaseAllocation], ids[MetaContextExceptions])
	rc.goExport("snap")

	// Pages 0-1 allocated, page 1 (only) in the COW store.
	rc.sendRequest(0, cmdBlockStatus, 1, 0, 4*pageSize, nil)
	byID := map[uint32][][2]uint32{}
	first := rc.readChunk()
	assert.Zero(t, first.flags&replyFlagDone, "first of two chunks")
	id, extents := blockStatusExtents(t, first)
	byID[id] = extents
	second := rc.readChunk()
	assert.Equal(t, replyFlagDone, second.flags&replyFlagDone, "last chunk")
	assert.Equal(t, uint64(1), second.cookie)
	id, extents = blockStatusExtents(t, second)
	byID[id] = extents
	assert.Equal(t, [][2]uint32{{2 * pageSize, 0}, {2 * pageSize, 3}}, byID[ids[metaContextBaseAllocation]])
	assert.Equal(t, [][2]uint32{{pageSize, 0}, {pageSize, COWExtentInCOW}, {2 * pageSize, 0}}, byID[ids[MetaContextExceptions]])

	rc.sendRequest(cmdFlagReqOne, cmdBlockStatus, 2, pageSize, 3*pageSize, nil)
	for range 2 {
		c := rc.readChunk()
		id, extents := blockStatusExtents(t, c)
		if id == ids[MetaContextExceptions] {
			assert.Equal(t, [][2]uint32{{pageSize, COWExtentInCOW}}, extents)
		} else {
			assert.Equal(t, [][2]uint32{{pageSize, 0}}, extents)
		}
	}
	rc.sendRequest(0, cmdDisc, 3, 0, 0, nil)
	rc.requireClosed()
}

func TestMetaContextExceptionsOnly(t *testing.T) {
	cow := newCOWMemBackend(1 << 20)
	cow.snapshot()
	require.NoError(t, cow.WriteAt(context.Background(), []byte("x"), 0, false))
	srv := NewServer([]Export{{Name: "snap", Backend: cow}}, Options{})
	rc := dialRaw(t, srv)
	rc.sendFlags(clientFlagFixedNewstyle | clientFlagNoZeroes)
	rc.sendOption(optStructuredReply, nil)
	typ, _ := rc.readOptionReply(optStructuredReply)
	require.Equal(t, repAck, typ)
	rc.sendOption(optSetMetaContext, metaRequest("snap", MetaContextExceptions))
	ids := rc.metaReplies(optSetMetaContext)
	require.Len(t, ids, 1)
	rc.goExport("snap")
	rc.sendRequest(0, cmdBlockStatus, 1, 0, 2*pageSize, nil)
	c := rc.readChunk()
	assert.Equal(t, replyFlagDone, c.flags)
	id, extents := blockStatusExtents(t, c)
	assert.Equal(t, ids[MetaContextExceptions], id)
	assert.Equal(t, [][2]uint32{{pageSize, COWExtentInCOW}, {pageSize, 0}}, extents)
}

func TestNbdinfoMapExceptions(t *testing.T) {
	nbdinfo := requireTool(t, "nbdinfo", "libnbd-bin")
	qemuIO := requireTool(t, "qemu-io", "qemu-utils")
	cow := newCOWMemBackend(4 << 20)
	ts := startServer(t, []Export{
		{Name: "snap", Backend: cow},
		{Name: "plain", Backend: newMemBackend(4 << 20)},
	}, Options{}, true)

	runTool(t, qemuIO, "-f", "raw", "-c", "write -P 1 0 256k", ts.uri("snap"))
	cow.snapshot()
	runTool(t, qemuIO, "-f", "raw", "-c", "write -P 2 64k 64k", "-c", "write -P 3 1M 4k", ts.uri("snap"))

	out := runTool(t, nbdinfo, "--map="+MetaContextExceptions, "--json", ts.uri("snap"))
	var extents []struct {
		Offset int64 `json:"offset"`
		Length int64 `json:"length"`
		Type   int   `json:"type"`
	}
	require.NoError(t, json.Unmarshal([]byte(out), &extents), out)
	type ext struct{ off, length, typ int64 }
	var got []ext
	for _, e := range extents {
		got = append(got, ext{e.Offset, e.Length, int64(e.Type)})
	}
	assert.Equal(t, []ext{
		{0, 64 << 10, 0},
		{64 << 10, 64 << 10, 1},
		{128 << 10, 1<<20 - 128<<10, 0},
		{1 << 20, 4 << 10, 1},
		{1<<20 + 4<<10, 3<<20 - 4<<10, 0},
	}, got)

	var listing struct {
		Exports []struct {
			Name     string   `json:"export-name"`
			Contexts []string `json:"contexts"`
		} `json:"exports"`
	}
	out = runTool(t, nbdinfo, "--list", "--json", ts.uri(""))
	require.NoError(t, json.Unmarshal([]byte(out), &listing), out)
	contexts := map[string][]string{}
	for _, e := range listing.Exports {
		contexts[e.Name] = e.Contexts
	}
	assert.ElementsMatch(t, []string{metaContextBaseAllocation, MetaContextExceptions}, contexts["snap"])
	assert.Equal(t, []string{metaContextBaseAllocation}, contexts["plain"])

	// nbdinfo refuses to map a context the export does not offer.
	out, err := runToolStatus(t, nbdinfo, "--map="+MetaContextExceptions, ts.uri("plain"))
	assert.Error(t, err, out)
	assert.Contains(t, out, "does not support metadata context")
}
