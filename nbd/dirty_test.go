package nbd

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// bitmapBackend is a memBackend with dirty bitmaps that tests set by hand:
// each bitmap marks pages dirty; a bitmap in broken answers with an error.
type bitmapBackend struct {
	*memBackend
	bmu     sync.Mutex
	bitmaps map[string][]bool
	broken  map[string]error
}

func newBitmapBackend(size int64, names ...string) *bitmapBackend {
	b := &bitmapBackend{memBackend: newMemBackend(size), bitmaps: map[string][]bool{}, broken: map[string]error{}}
	for _, n := range names {
		b.addBitmap(n)
	}
	return b
}

func (b *bitmapBackend) addBitmap(name string) {
	b.bmu.Lock()
	defer b.bmu.Unlock()
	b.bitmaps[name] = make([]bool, len(b.allocated))
}

func (b *bitmapBackend) removeBitmap(name string) {
	b.bmu.Lock()
	defer b.bmu.Unlock()
	delete(b.bitmaps, name)
}

func (b *bitmapBackend) breakBitmap(name string, err error) {
	b.bmu.Lock()
	defer b.bmu.Unlock()
	b.broken[name] = err
}

// markDirty marks the pages of [off, off+length) dirty in bitmap name.
func (b *bitmapBackend) markDirty(name string, off, length int64) {
	b.bmu.Lock()
	defer b.bmu.Unlock()
	for pg := off / pageSize; pg*pageSize < off+length; pg++ {
		b.bitmaps[name][pg] = true
	}
}

func (b *bitmapBackend) DirtyBitmaps() []string {
	b.bmu.Lock()
	defer b.bmu.Unlock()
	var names []string
	for n := range b.bitmaps {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

func (b *bitmapBackend) DirtyExtents(_ context.Context, name string, off, length int64) ([]DirtyExtent, error) {
	b.bmu.Lock()
	defer b.bmu.Unlock()
	if err := b.broken[name]; err != nil {
		return nil, err
	}
	pages, ok := b.bitmaps[name]
	if !ok {
		return nil, fmt.Errorf("bitmap %s: %w", name, ErrNoSuchBitmap)
	}
	var out []DirtyExtent
	for pos := off; pos < off+length; {
		state := pages[pos/pageSize]
		end := (pos/pageSize + 1) * pageSize
		for end < int64(len(b.data)) && pages[end/pageSize] == state {
			end += pageSize
		}
		end = min(end, int64(len(b.data)))
		out = append(out, DirtyExtent{Length: end - pos, Dirty: state})
		pos = end
	}
	return out, nil
}

// structuredClient connects to srv and negotiates structured replies.
func structuredClient(t *testing.T, srv *Server) *rawClient {
	t.Helper()
	rc := dialRaw(t, srv)
	rc.sendFlags(clientFlagFixedNewstyle | clientFlagNoZeroes)
	rc.sendOption(optStructuredReply, nil)
	typ, _ := rc.readOptionReply(optStructuredReply)
	require.Equal(t, repAck, typ)
	return rc
}

// listContexts sends LIST_META_CONTEXT and returns the names listed.
func (rc *rawClient) listContexts(export string, queries ...string) []string {
	rc.t.Helper()
	rc.sendOption(optListMetaContext, metaRequest(export, queries...))
	var names []string
	for name, id := range rc.metaReplies(optListMetaContext) {
		assert.Zero(rc.t, id, "LIST gives no ids")
		names = append(names, name)
	}
	slices.Sort(names)
	return names
}

// blockStatusReply reads the chunks answering one BLOCK_STATUS, up to the
// one flagged DONE, as context id → extents.
func (rc *rawClient) blockStatusReply(cookie uint64) map[uint32][][2]uint32 {
	rc.t.Helper()
	got := map[uint32][][2]uint32{}
	for {
		c := rc.readChunk()
		require.Equal(rc.t, cookie, c.cookie)
		id, extents := blockStatusExtents(rc.t.(*testing.T), c)
		_, dup := got[id]
		require.False(rc.t, dup, "context %d answered twice", id)
		got[id] = extents
		if c.flags&replyFlagDone != 0 {
			return got
		}
	}
}

// errorChunk reads a structured error reply and returns its errno.
func (rc *rawClient) errorChunk(cookie uint64) uint32 {
	rc.t.Helper()
	c := rc.readChunk()
	require.Equal(rc.t, cookie, c.cookie)
	require.Equal(rc.t, replyTypeError, c.typ)
	require.Equal(rc.t, replyFlagDone, c.flags&replyFlagDone)
	return binary.BigEndian.Uint32(c.payload)
}

func TestDirtyBitmapListing(t *testing.T) {
	cow := newCOWMemBackend(1 << 20)
	srv := NewServer([]Export{
		{Name: "origin", Backend: newBitmapBackend(1<<20, "s1", "s2")},
		{Name: "plain", Backend: newMemBackend(1 << 20)},
		{Name: "cow", Backend: cow},
	}, Options{})
	rc := structuredClient(t, srv)
	s1, s2 := DirtyBitmapNamespace+"s1", DirtyBitmapNamespace+"s2"
	for _, l := range []struct {
		export  string
		queries []string
		want    []string
	}{
		{"origin", nil, []string{metaContextBaseAllocation, s1, s2}},
		{"origin", []string{"qemu:"}, []string{s1, s2}},
		{"origin", []string{DirtyBitmapNamespace}, []string{s1, s2}},
		{"origin", []string{s2}, []string{s2}},
		{"origin", []string{s2, s2, "qemu:"}, []string{s1, s2}},
		{"origin", []string{"base:", s1}, []string{metaContextBaseAllocation, s1}},
		{"origin", []string{DirtyBitmapNamespace + "s3", "qemu:dirty-bitmap", "qemu:allocation-depth", "qemu:dirty-bitmap:s", "QEMU:dirty-bitmap:s1", "clustersnap:"}, nil},
		{"plain", []string{"qemu:"}, nil},
		{"cow", nil, []string{metaContextBaseAllocation, MetaContextExceptions}},
	} {
		assert.Equal(t, l.want, rc.listContexts(l.export, l.queries...), "%s %q", l.export, l.queries)
	}
}

func TestDirtyBitmapSelectAndBlockStatus(t *testing.T) {
	origin := newBitmapBackend(1<<20, "s1", "s2")
	origin.markDirty("s1", pageSize, 2*pageSize)
	origin.markDirty("s2", 3*pageSize, pageSize)
	srv := NewServer([]Export{{Name: "origin", Backend: origin}}, Options{})
	rc := structuredClient(t, srv)
	s1, s2 := DirtyBitmapNamespace+"s1", DirtyBitmapNamespace+"s2"

	// A bare namespace selects nothing; an empty SET clears the selection.
	rc.sendOption(optSetMetaContext, metaRequest("origin", "qemu:", DirtyBitmapNamespace))
	assert.Empty(t, rc.metaReplies(optSetMetaContext))

	rc.sendOption(optSetMetaContext, metaRequest("origin", s1, s1))
	first := rc.metaReplies(optSetMetaContext)
	require.Len(t, first, 1, "a context named twice is selected once")

	rc.sendOption(optSetMetaContext, metaRequest("origin", s2, metaContextBaseAllocation, s1))
	ids := rc.metaReplies(optSetMetaContext)
	require.Len(t, ids, 3)
	seen := map[uint32]bool{first[s1]: true}
	for _, id := range ids {
		assert.False(t, seen[id], "id %d given twice on the connection: %v then %v", id, first, ids)
		seen[id] = true
	}
	assert.Equal(t, metaContextBaseAllocationID, ids[metaContextBaseAllocation])
	rc.goExport("origin")

	rc.sendRequest(0, cmdBlockStatus, 1, 0, 8*pageSize, nil)
	got := rc.blockStatusReply(1)
	assert.Equal(t, map[uint32][][2]uint32{
		ids[metaContextBaseAllocation]: {{8 * pageSize, 3}},
		ids[s1]:                        {{pageSize, 0}, {2 * pageSize, DirtyExtentDirty}, {5 * pageSize, 0}},
		ids[s2]:                        {{3 * pageSize, 0}, {pageSize, DirtyExtentDirty}, {4 * pageSize, 0}},
	}, got)

	rc.sendRequest(cmdFlagReqOne, cmdBlockStatus, 2, 2*pageSize, 2*pageSize, nil)
	got = rc.blockStatusReply(2)
	assert.Equal(t, map[uint32][][2]uint32{
		ids[metaContextBaseAllocation]: {{2 * pageSize, 3}},
		ids[s1]:                        {{pageSize, DirtyExtentDirty}},
		ids[s2]:                        {{pageSize, 0}},
	}, got)
}

// A bitmap that disappears after it was selected, or that cannot be
// trusted, fails the block status requests that ask for it with EIO; the
// connection goes on, and bitmaps that appear are listed at once.
func TestDirtyBitmapDynamic(t *testing.T) {
	origin := newBitmapBackend(1<<20, "s1", "s2")
	origin.markDirty("s2", 0, pageSize)
	srv := NewServer([]Export{{Name: "origin", Backend: origin}}, Options{})
	rc := structuredClient(t, srv)
	s1, s2, s3 := DirtyBitmapNamespace+"s1", DirtyBitmapNamespace+"s2", DirtyBitmapNamespace+"s3"

	origin.addBitmap("s3")
	assert.Equal(t, []string{s1, s2, s3}, rc.listContexts("origin", "qemu:"))
	rc.sendOption(optSetMetaContext, metaRequest("origin", s1, s2))
	ids := rc.metaReplies(optSetMetaContext)
	require.Len(t, ids, 2)
	origin.removeBitmap("s3")
	assert.Equal(t, []string{s1, s2}, rc.listContexts("origin", "qemu:"))
	rc.goExport("origin")

	origin.removeBitmap("s1")
	rc.sendRequest(0, cmdBlockStatus, 1, 0, pageSize, nil)
	assert.Equal(t, errIO, rc.errorChunk(1), "a removed bitmap")

	origin.addBitmap("s1")
	origin.breakBitmap("s2", errors.New("snapshot s2 is invalid"))
	rc.sendRequest(0, cmdBlockStatus, 2, 0, pageSize, nil)
	assert.Equal(t, errIO, rc.errorChunk(2), "an invalid bitmap")

	origin.breakBitmap("s2", nil)
	rc.sendRequest(0, cmdBlockStatus, 3, 0, 2*pageSize, nil)
	assert.Equal(t, map[uint32][][2]uint32{
		ids[s1]: {{2 * pageSize, 0}},
		ids[s2]: {{pageSize, DirtyExtentDirty}, {pageSize, 0}},
	}, rc.blockStatusReply(3), "the bitmaps answer again once they are back")

	rc.sendRequest(0, cmdRead, 4, 0, 512, nil)
	c := rc.readChunk()
	assert.Equal(t, replyTypeOffsetData, c.typ, "the connection goes on")
	assert.Equal(t, []ExportStats{{Name: "origin", ConnectionsOpen: 1, ConnectionsTotal: 1, BlockStatus: 1, Reads: 1, ReadBytes: 512, Errors: 2}}, srv.Stats())
}

// Contexts chosen for an export do not carry over to another export, nor to
// a new export of the same name: a block status request then has no context
// and is refused, whatever the new backend offers.
func TestDirtyBitmapSelectionIsPerExport(t *testing.T) {
	srv := NewServer([]Export{
		{Name: "a", Backend: newBitmapBackend(1<<20, "s1")},
		{Name: "b", Backend: newBitmapBackend(1<<20, "s1")},
	}, Options{})
	rc := structuredClient(t, srv)
	rc.sendOption(optSetMetaContext, metaRequest("a", DirtyBitmapNamespace+"s1"))
	require.Len(t, rc.metaReplies(optSetMetaContext), 1)
	rc.goExport("b")
	rc.sendRequest(0, cmdBlockStatus, 1, 0, pageSize, nil)
	assert.Equal(t, errInval, rc.errorChunk(1))

	rc = structuredClient(t, srv)
	rc.sendOption(optSetMetaContext, metaRequest("a", DirtyBitmapNamespace+"s1", MetaContextExceptions))
	require.Len(t, rc.metaReplies(optSetMetaContext), 1)
	require.NoError(t, srv.RemoveExport(t.Context(), "a"))
	require.NoError(t, srv.AddExport(Export{Name: "a", Backend: newMemBackend(1 << 20)}))
	rc.goExport("a")
	rc.sendRequest(0, cmdBlockStatus, 2, 0, pageSize, nil)
	assert.Equal(t, errInval, rc.errorChunk(2))
}

func TestDirtyBitmapMalformedQueries(t *testing.T) {
	srv := NewServer([]Export{{Name: "origin", Backend: newBitmapBackend(1<<20, "s1")}}, Options{})

	// Without structured replies there are no contexts.
	rc := dialRaw(t, srv)
	rc.sendFlags(clientFlagFixedNewstyle | clientFlagNoZeroes)
	rc.sendOption(optSetMetaContext, metaRequest("origin", DirtyBitmapNamespace+"s1"))
	typ, _ := rc.readOptionReply(optSetMetaContext)
	assert.Equal(t, repErrInvalid, typ)

	rc = structuredClient(t, srv)
	good := metaRequest("origin", DirtyBitmapNamespace+"s1")
	long := metaRequest("origin", DirtyBitmapNamespace+strings.Repeat("x", maxStringLength))
	for name, data := range map[string][]byte{
		"query count past the data":   binary.BigEndian.AppendUint32(metaRequest("origin")[:10], 2),
		"query length past the data":  good[:len(good)-1],
		"trailing data":               append(slices.Clone(good), 0),
		"query over the string limit": long,
		"no query count":              good[:8],
		"name length past the data":   {0, 0, 1, 0, 'o'},
	} {
		for _, opt := range []uint32{optListMetaContext, optSetMetaContext} {
			rc.sendOption(opt, data)
			typ, _ := rc.readOptionReply(opt)
			assert.Equal(t, repErrInvalid, typ, "%s, option %d", name, opt)
		}
	}
	rc.sendOption(optSetMetaContext, metaRequest("nosuch", DirtyBitmapNamespace+"s1"))
	typ, _ = rc.readOptionReply(optSetMetaContext)
	assert.Equal(t, repErrUnknown, typ)

	// The failed SETs selected nothing; a good one still works.
	rc.sendOption(optSetMetaContext, good)
	require.Len(t, rc.metaReplies(optSetMetaContext), 1)
	rc.goExport("origin")
	rc.sendRequest(0, cmdBlockStatus, 1, 0, pageSize, nil)
	assert.Len(t, rc.blockStatusReply(1), 1)
}

// mapExtent is one extent of nbdinfo --map --json.
type mapExtent struct {
	Offset      int64  `json:"offset"`
	Length      int64  `json:"length"`
	Type        uint32 `json:"type"`
	Description string `json:"description"`
}

func TestNbdinfoDirtyBitmap(t *testing.T) {
	nbdinfo := requireTool(t, "nbdinfo", "libnbd-bin")
	qemuImg := requireTool(t, "qemu-img", "qemu-utils")
	origin := newBitmapBackend(4<<20, "s1", "s2")
	origin.markDirty("s1", 64<<10, 64<<10)
	origin.markDirty("s1", 1<<20, 4<<10)
	origin.markDirty("s2", 2<<20, 8<<10)
	ts := startServer(t, []Export{
		{Name: "origin", Backend: origin},
		{Name: "plain", Backend: newMemBackend(4 << 20)},
	}, Options{}, true)

	out := runTool(t, nbdinfo, "--map="+DirtyBitmapNamespace+"s1", "--json", ts.uri("origin"))
	var extents []mapExtent
	require.NoError(t, json.Unmarshal([]byte(out), &extents), out)
	assert.Equal(t, []mapExtent{
		{0, 64 << 10, 0, "clean"},
		{64 << 10, 64 << 10, 1, "dirty"},
		{128 << 10, 1<<20 - 128<<10, 0, "clean"},
		{1 << 20, 4 << 10, 1, "dirty"},
		{1<<20 + 4<<10, 3<<20 - 4<<10, 0, "clean"},
	}, extents)

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
	assert.ElementsMatch(t, []string{metaContextBaseAllocation, DirtyBitmapNamespace + "s1", DirtyBitmapNamespace + "s2"}, contexts["origin"])
	assert.Equal(t, []string{metaContextBaseAllocation}, contexts["plain"])

	out = runTool(t, nbdinfo, "--content", ts.uri("origin"))
	assert.Contains(t, out, "contexts:\n\t\tbase:allocation\n\t\tqemu:dirty-bitmap:s1\n\t\tqemu:dirty-bitmap:s2\n", out)

	// qemu reads the context x-dirty-bitmap names in place of
	// base:allocation, so the dirty bit is read as its "hole" bit: dirty
	// ranges show as neither present nor data, clean ones as both.
	out = runTool(t, qemuImg, "map", "--output=json", "--image-opts",
		"driver=nbd,server.type=unix,server.path="+ts.socket+",export=origin,x-dirty-bitmap="+DirtyBitmapNamespace+"s2")
	type qemuExtent struct {
		Start   int64 `json:"start"`
		Length  int64 `json:"length"`
		Present bool  `json:"present"`
		Zero    bool  `json:"zero"`
		Data    bool  `json:"data"`
	}
	var qemuMap []qemuExtent
	require.NoError(t, json.Unmarshal([]byte(out), &qemuMap), out)
	assert.Equal(t, []qemuExtent{
		{0, 2 << 20, true, false, true},
		{2 << 20, 8 << 10, false, false, false},
		{2<<20 + 8<<10, 2<<20 - 8<<10, true, false, true},
	}, qemuMap)

	// nbdinfo refuses to map a bitmap there is not.
	out, err := runToolStatus(t, nbdinfo, "--map="+DirtyBitmapNamespace+"s3", ts.uri("origin"))
	assert.Error(t, err, out)
	assert.Contains(t, out, "does not support metadata context")
}
