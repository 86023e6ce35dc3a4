package cluster

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/internal/cutcheck"
	"github.com/clustersnap/clustersnap/persistent"
	"github.com/clustersnap/clustersnap/test/clusterload"
	"github.com/clustersnap/clustersnap/test/guest"
	"github.com/clustersnap/clustersnap/volumes"
)

// The layout of TestClusterLive. Every guest sees the same shared disks
// at the same paths: the origin (/dev/vda), the COW of the snapshot it
// serves from the start (/dev/vdb, "snap"), the control disk (/dev/vdc),
// the catalog (/dev/vdd) and the blank disks the live snapshot's COW is
// formatted on: /dev/vde for testLiveSnapshot's, /dev/vdf for
// testLiveMerge's.
const (
	liveOriginBytes = 4 << 20
	liveSnapCOW     = 8 << 20
	liveCatalog     = 1 << 20
	liveCOWBytes    = 8 << 20
	liveCatalogDisk = "/dev/vdd"
	liveCOWDisk     = "/dev/vde"
	mergeCOWDisk    = "/dev/vdf"
	// liveRegionBytes is a region of the cut checker: every write fills
	// one, across several chunks of either COW.
	liveRegionBytes = 2 * clusterload.ChunkBytes
	// liveSnapshot is the snapshot created live, and its export.
	liveSnapshot = "live"
	// liveWarm is how many writes each writer has acknowledged before the
	// snapshot is asked for, and liveAfter how many more after it
	// returned before the writers stop.
	liveWarm, liveAfter = 20, 30
)

// The control words of TestClusterLive, which the host writes to
// the control disk. Each guest acts on a word once, when it first reads
// it, if the word is one of its own (liveOps), and then prints a result
// line (liveMarker).
const (
	liveCreate      = "create"       // node 1: snapd snapshot create, on liveCOWDisk
	liveCreateMerge = "create-merge" // node 1: snapd snapshot create, on mergeCOWDisk
	liveDelete      = "delete"       // node 2: snapd snapshot delete
	liveMergeStart  = "merge"        // node 1: snapd merge --no-wait of the live snapshot
	liveMergeWait   = "merge-wait"   // node 1: snapd merge of the live snapshot, waiting for its end
	liveList        = "list"         // every node: snapd snapshot list --json
	liveStop        = "stop"         // every node: SIGTERM to snapd, and its exit status
	liveOff         = "off"          // every node: the script ends, the guest powers off
)

// liveOps are the commands guest i runs for the control words it acts on
// (liveStop and liveOff are every node's, in the script itself).
func liveOps(i int) map[string]string {
	ops := map[string]string{liveList: "snapd snapshot list --control /run/snapd.ctl --json"}
	switch i {
	case 1:
		ops[liveCreate] = fmt.Sprintf("snapd snapshot create --control /run/snapd.ctl --name %s --cow %s", liveSnapshot, liveCOWDisk)
		ops[liveCreateMerge] = fmt.Sprintf("snapd snapshot create --control /run/snapd.ctl --name %s --cow %s", liveSnapshot, mergeCOWDisk)
		ops[liveMergeStart] = "snapd merge --control /run/snapd.ctl --json --no-wait --snapshot " + liveSnapshot
		ops[liveMergeWait] = "snapd merge --control /run/snapd.ctl --json --snapshot " + liveSnapshot
	case 2:
		ops[liveDelete] = "snapd snapshot delete --control /run/snapd.ctl " + liveSnapshot
	}
	return ops
}

// liveMarker ends guest i's result line for word, which holds the
// command's output (newlines and tabs removed), then " rc=" and its exit
// status, then a space and this marker: once the marker is on the
// console, so is the whole line.
func liveMarker(word string, i int) string { return fmt.Sprintf("@@live-%s node=%d@@", word, i) }

// liveResult is the output and exit status of guest i's last result line
// for word on console; ok is false while there is none.
func liveResult(console, word string, i int) (out string, rc int, ok bool) {
	k := strings.LastIndex(console, liveMarker(word, i))
	if k < 0 {
		return "", 0, false
	}
	line := console[strings.LastIndex(console[:k], "\n")+1 : k]
	j := strings.LastIndex(line, " rc=")
	if j < 0 {
		return "", 0, false
	}
	rc, err := strconv.Atoi(strings.TrimSpace(line[j+len(" rc="):]))
	if err != nil {
		return "", 0, false
	}
	return strings.TrimSpace(line[:j]), rc, true
}

// liveScript returns the script of guest i: it serves as serveScript
// does, with the catalog and flags added to snapd serve's, and then acts
// on the control words until liveOff. Nothing announces a new word, so it
// polls the control disk (bounded).
func liveScript(flags string) func(i int) string {
	return func(i int) string { return liveScriptWith(i, flags) }
}

// liveScriptWith is the script of liveScript(flags) for guest i.
func liveScriptWith(i int, flags string) string {
	before := `t=0
until [ -b /dev/vdc ] && [ -b ` + liveCatalogDisk + ` ] && [ -b ` + liveCOWDisk + ` ] && [ -b ` + mergeCOWDisk + ` ]; do
	t=$((t + 1)); [ $t -le 300 ] || { echo "the control, catalog and COW disks did not appear"; exit 1; }
	sleep 0.1
done
`
	var cases strings.Builder
	ops := liveOps(i)
	for _, word := range slices.Sorted(maps.Keys(ops)) {
		fmt.Fprintf(&cases, "\t\t%s) rc=0; %s >/tmp/op.out 2>&1 || rc=$?; echo \"$(tr -d '\\n\\t' </tmp/op.out) rc=$rc %s\" ;;\n",
			word, ops[word], liveMarker(word, i))
	}
	then := fmt.Sprintf(`ctl() { dd if=/dev/vdc bs=512 count=1 iflag=direct status=none | head -n 1; }
last=
stopped=
t=0
while :; do
	w=$(ctl)
	if [ "$w" != "$last" ]; then
		last=$w
		case "$w" in
%[1]s		%[2]s) kill -TERM $pid; rc=0; wait $pid || rc=$?; stopped=1; cat /tmp/snapd.log; echo "snapd rc=$rc %[3]s" ;;
		%[4]s) exit 0 ;;
		esac
	fi
	[ -n "$stopped" ] || kill -0 $pid 2>/dev/null || { cat /tmp/snapd.log; echo "snapd exited"; exit 1; }
	t=$((t + 1)); [ $t -le 4500 ] || { echo "the host never ended the test"; exit 1; }
	sleep 0.2
done
`, cases.String(), liveStop, liveMarker(liveStop, i), liveOff)
	return serveScriptWith(i, " --catalog "+liveCatalogDisk+flags, before, then)
}

// TestClusterLive boots three guests that serve one origin (all zero)
// and its snapshot "snap" with snapd serve --lock dlm, a catalog on a
// shared disk and --merge-step 64KiB, and runs the live tests on them in
// turn: testLiveSnapshot, then testLiveMerge (which needs the first to
// have passed). Then every snapd must exit 0 on SIGTERM and every guest
// power off with its script's status 0. On the images: "snap"'s COW is
// clean and still holds the original origin (a merge leaves the other
// snapshots valid), the deleted snapshot's COW is marked invalid, the
// origin image is what the nodes read after the merge, and the merged
// COW is labelled merged and holds no exception.
func TestClusterLive(t *testing.T) {
	nbdcopy := lookNbdcopy(t)
	r := clusterInitramfs(t)
	ctx, cancel := context.WithTimeout(t.Context(), 14*time.Minute)
	defer cancel()
	// The origin's regions before any write: stamp 0, all zero.
	zero := make([]byte, liveOriginBytes)
	lc := startLiveCluster(ctx, t, r, nbdcopy, zero, " --merge-step "+mergeStep)
	if !t.Run("Snapshot", func(t *testing.T) {
		lc.t = t
		testLiveSnapshot(lc)
	}) {
		return
	}
	var merged []byte
	if !t.Run("Merge", func(t *testing.T) {
		lc.t = t
		merged = testLiveMerge(lc)
	}) {
		return
	}
	lc.t = t
	lc.stop()

	// The images.
	head := make([]byte, persistent.HeaderSize)
	f, err := os.Open(lc.liveCOW)
	require.NoError(t, err)
	_, err = f.ReadAt(head, 0)
	f.Close()
	require.NoError(t, err)
	hdr := persistent.DecodeHeader(head)
	assert.Equal(t, persistent.Magic, hdr.Magic, "the deleted snapshot's COW header")
	assert.Zero(t, hdr.Valid, "the deleted snapshot's COW is not marked invalid")
	origin, view, _ := clusterload.FinalImages(ctx, t, lc.origin, lc.snapCOW)
	assert.True(t, bytes.Equal(zero, view), "snap's COW does not hold the original origin")
	assert.True(t, bytes.Equal(merged, origin), "the origin image is not what the nodes read after the merge")
	dev, err := blockdev.Open(lc.mergeCOW, blockdev.Options{ReadOnly: true})
	require.NoError(t, err)
	defer dev.Close()
	report, err := persistent.Check(ctx, dev, nil)
	require.NoError(t, err)
	assert.True(t, report.OK(), "the merged COW: %+v", report)
	store, err := persistent.Open(ctx, dev, persistent.Options{})
	require.NoError(t, err)
	defer store.Close()
	assert.Zero(t, store.Usage().Exceptions, "exceptions left in the merged COW")
	label, _, err := store.Label(ctx)
	require.NoError(t, err)
	assert.Equal(t, exstore.Merged, label.Merge, "the merged COW's label")
}

// testLiveSnapshot, on the guests of TestClusterLive: while
// the host writes the origin through nodes 2 and 3 (one request at a time
// per connection, every write filling a region with a stamp, every
// acknowledgement logged in a cutcheck.History), node 1 runs 'snapd
// snapshot create' on a blank shared disk. The new snapshot, read
// through each node with nbdcopy, is the same everywhere and a cut of the
// logged writes, and "snap" is still the original origin. Then 'snapd
// snapshot delete' on node 2 takes it off every node: after one origin
// write through each node, 'snapd snapshot list' lists only "snap" there
// and its export is gone.
//
// The cut's bracket is what the host can observe of the create. The
// host logs CutBegins before it writes the control word, and the guest
// starts the command only after it read the word, so every write the
// host saw acknowledged before CutBegins was acknowledged before the
// create began. The guest prints its result line only after the command
// returned, and the host logs CutEnds only once that line is on the
// console, so every write sent after CutEnds was sent after the create
// returned. The bracket is wider than the create (the control disk's
// polling, the console's latency): writes acknowledged or sent in that
// margin may show or not, which cutcheck allows for writes in flight; it
// never narrows what the snapshot must hold.
func testLiveSnapshot(lc *liveCluster) {
	t, ctx := lc.t, lc.ctx
	zero := lc.original
	// The writers: nodes 2 and 3 write random regions of the origin until
	// each has acknowledged liveAfter writes since the cut ended.
	h := cutcheck.New(liveRegionBytes)
	cut := &liveCut{}
	writers := map[int]*liveWriter{}
	for _, i := range []int{2, 3} {
		cl, err := clusterload.Dial(ctx, "tcp", lc.addrs[i], volumes.OriginExport)
		require.NoError(t, err, "node %d", i)
		w := &liveWriter{warm: make(chan struct{}), done: make(chan struct{})}
		writers[i] = w
		go w.run(ctx, cl, h, cut, rand.New(rand.NewPCG(20, uint64(i))))
	}
	// waitWriters waits until every writer closed ch (warm or done) and
	// fails the test if one stopped on an error.
	waitWriters := func(ch func(*liveWriter) <-chan struct{}) {
		t.Helper()
		for i, w := range writers {
			select {
			case <-ch(w):
			case <-ctx.Done():
				lc.fail("node %d's writer: %v", i, ctx.Err())
			}
			select {
			case <-w.done:
				if w.err != nil {
					lc.fail("node %d: origin write: %v", i, w.err)
				}
			default:
			}
		}
	}
	waitWriters(func(w *liveWriter) <-chan struct{} { return w.warm })

	h.CutBegins()
	cut.begun.Store(true)
	began := time.Now()
	out := lc.do(liveCreate, 1)[1]
	h.CutEnds()
	cut.done.Store(true)
	t.Logf("node 1 created the snapshot in %v as the host saw it, while nodes 2 and 3 acknowledged %d writes: %s",
		time.Since(began).Round(100*time.Millisecond), cut.acked.Load(), out)
	waitWriters(func(w *liveWriter) <-chan struct{} { return w.done })
	sent, acked := h.Writes()
	t.Logf("%d writes sent through nodes 2 and 3, %d acknowledged", sent, acked)

	// The new snapshot through every node: the same image, a cut; and
	// "snap", the original origin.
	var first []byte
	for i := 1; i <= nodes; i++ {
		got := lc.read(i, liveSnapshot)
		if first == nil {
			first = got
			assert.Empty(t, h.Check(got, 10), "the snapshot is not a cut of the logged writes")
			shown := 0
			for r := 0; r < liveOriginBytes/liveRegionBytes; r++ {
				if !bytes.Equal(got[r*liveRegionBytes:(r+1)*liveRegionBytes], zero[:liveRegionBytes]) {
					shown++
				}
			}
			t.Logf("the snapshot shows a write in %d of %d regions", shown, liveOriginBytes/liveRegionBytes)
		} else {
			assert.True(t, bytes.Equal(first, got), "node %d reads the snapshot otherwise than node 1", i)
		}
		assert.True(t, bytes.Equal(zero, lc.read(i, clusterload.SnapshotExport)), "node %d: snap is no longer the original origin", i)
	}

	// The delete on node 2; every node takes it on before its next origin
	// write.
	lc.do(liveDelete, 2)
	for i := 1; i <= nodes; i++ {
		lc.write(i, 0, make([]byte, liveRegionBytes))
	}
	lc.checkOnlySnap()
}

// lookNbdcopy is the path of nbdcopy; the test is skipped without it,
// and fails on CI.
func lookNbdcopy(t *testing.T) string {
	t.Helper()
	nbdcopy, err := exec.LookPath("nbdcopy")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("nbdcopy not found: apt-get install libnbd-bin")
		}
		t.Skip("nbdcopy not found: apt-get install libnbd-bin")
	}
	return nbdcopy
}

// liveCluster is three guests running liveScript over the images of a
// live test, and the host's side of the control words.
type liveCluster struct {
	t       *testing.T
	ctx     context.Context
	c       *guest.DLMCluster
	nbdcopy string
	dir     string
	start   time.Time
	// The images: the origin (/dev/vda), the COW of "snap" (/dev/vdb),
	// the control disk (/dev/vdc), the blank disks of the live snapshots'
	// COWs (/dev/vde, /dev/vdf); the catalog (/dev/vdd) is the guests'
	// only.
	origin, snapCOW, control, liveCOW, mergeCOW string
	// original is the origin as the guests found it: what "snap" holds.
	original []byte
	addrs    []string // each node's NBD address, by node; [0] unused
}

// startLiveCluster writes the images (the origin holding origin, "snap"'s
// COW formatted, the others zero), boots the guests with liveScript(flags)
// and waits until every node serves.
func startLiveCluster(ctx context.Context, t *testing.T, r *guest.Initramfs, nbdcopy string, origin []byte, flags string) *liveCluster {
	t.Helper()
	dir := t.TempDir()
	lc := &liveCluster{t: t, ctx: ctx, nbdcopy: nbdcopy, dir: dir,
		origin: filepath.Join(dir, "origin.img"), snapCOW: filepath.Join(dir, "snap.cow"),
		control: filepath.Join(dir, "control.img"), liveCOW: filepath.Join(dir, "live.cow"), mergeCOW: filepath.Join(dir, "merge.cow"),
		original: origin}
	catalog := filepath.Join(dir, "catalog.img")
	require.Len(t, origin, liveOriginBytes)
	require.NoError(t, os.WriteFile(lc.origin, origin, 0o600))
	for path, size := range map[string]int{lc.control: 1 << 20, catalog: liveCatalog, lc.liveCOW: liveCOWBytes, lc.mergeCOW: liveCOWBytes} {
		require.NoError(t, os.WriteFile(path, make([]byte, size), 0o600))
	}
	require.NoError(t, blockdev.Create(lc.snapCOW, liveSnapCOW))
	clusterload.FormatCOW(t, lc.snapCOW, clusterload.ChunkBytes)

	ports := make([]int, nodes+1)
	lc.addrs = make([]string, nodes+1)
	for i := 1; i <= nodes; i++ {
		ports[i] = freePort(t)
		lc.addrs[i] = fmt.Sprintf("127.0.0.1:%d", ports[i])
	}
	lc.start = time.Now()
	c, err := guest.StartDLMCluster(ctx, r, guest.DLMClusterOptions{
		Nodes:     nodes,
		MemoryMiB: 768,
		QEMUArgs: func(i int) []string {
			return append(sharedDisks(lc.origin, lc.snapCOW, lc.control, catalog, lc.liveCOW, lc.mergeCOW), forwardArgs(i, ports[i])...)
		},
		Script:  liveScript(flags),
		Console: consoleFiles(t),
	})
	require.NoError(t, err)
	t.Cleanup(c.Close)
	lc.c = c
	for i := 1; i <= nodes; i++ {
		if err := c.Machine(i).WaitConsole(ctx, servingMarker(i)); err != nil {
			lc.fail("node %d: %v", i, err)
		}
	}
	t.Logf("three snapd nodes serving after %v", time.Since(lc.start).Round(time.Second))
	return lc
}

// fail logs every guest's console tail and fails the test.
func (lc *liveCluster) fail(format string, args ...any) {
	lc.t.Helper()
	// The reason first: CI may show only the start of a long log.
	lc.t.Errorf(format, args...)
	for i := 1; i <= nodes; i++ {
		lc.t.Logf("node %d console tail:\n%s", i, consoleTail(lc.c.Machine(i).Console(), 40))
	}
	lc.t.FailNow()
}

// do writes word to the control disk and waits for the result line of
// each node in who, which must report exit status 0; it returns their
// outputs by node.
func (lc *liveCluster) do(word string, who ...int) map[int]string {
	lc.t.Helper()
	setControl(lc.t, lc.control, word)
	outs := map[int]string{}
	for _, i := range who {
		if err := lc.c.Machine(i).WaitConsole(lc.ctx, liveMarker(word, i)); err != nil {
			lc.fail("node %d: %s: %v", i, word, err)
		}
		out, rc, ok := liveResult(lc.c.Machine(i).Console(), word, i)
		if !ok || rc != 0 {
			lc.fail("node %d: %s: exit status %d (result line well-formed: %v): %s", i, word, rc, ok, out)
		}
		outs[i] = out
	}
	return outs
}

// read is export as nbdcopy copies it through node i.
func (lc *liveCluster) read(i int, export string) []byte {
	lc.t.Helper()
	img := filepath.Join(lc.dir, fmt.Sprintf("%s-%d.img", export, i))
	out, err := exec.CommandContext(lc.ctx, lc.nbdcopy, fmt.Sprintf("nbd://%s/%s", lc.addrs[i], export), img).CombinedOutput()
	require.NoError(lc.t, err, "nbdcopy of %s from node %d: %s", export, i, out)
	got, err := os.ReadFile(img)
	require.NoError(lc.t, err)
	require.Len(lc.t, got, liveOriginBytes, "%s through node %d", export, i)
	return got
}

// write writes p to the origin at off through node i, on a connection of
// its own.
func (lc *liveCluster) write(i int, off uint64, p []byte) {
	lc.t.Helper()
	cl, err := clusterload.Dial(lc.ctx, "tcp", lc.addrs[i], volumes.OriginExport)
	require.NoError(lc.t, err, "node %d", i)
	defer cl.Close()
	ctx, cancel := context.WithTimeout(lc.ctx, requestTimeout)
	defer cancel()
	require.NoError(lc.t, cl.Write(ctx, off, p), "node %d: origin write", i)
}

// checkOnlySnap checks that every node serves "snap" and no other
// snapshot: 'snapd snapshot list' lists only it, and the live snapshot's
// export is refused.
func (lc *liveCluster) checkOnlySnap() {
	lc.t.Helper()
	for i, out := range lc.do(liveList, 1, 2, 3) {
		var snaps []volumes.SnapshotStatus
		require.NoError(lc.t, json.Unmarshal([]byte(out), &snaps), "node %d: snapshot list: %s", i, out)
		var names []string
		for _, s := range snaps {
			names = append(names, s.Name)
		}
		assert.Equal(lc.t, []string{clusterload.SnapshotExport}, names, "node %d serves these snapshots", i)
		if cl, err := clusterload.Dial(lc.ctx, "tcp", lc.addrs[i], liveSnapshot); err == nil {
			cl.Close()
			lc.t.Errorf("node %d still serves the %s snapshot's export", i, liveSnapshot)
		}
	}
}

// stop stops every snapd, which must exit 0 on SIGTERM while the others
// still run, and then every guest, whose script must end with status 0.
func (lc *liveCluster) stop() {
	lc.t.Helper()
	lc.do(liveStop, 1, 2, 3)
	setControl(lc.t, lc.control, liveOff)
	for i := 1; i <= nodes; i++ {
		res, err := lc.c.Machine(i).Wait(lc.ctx)
		require.NoError(lc.t, err, "node %d", i)
		assert.Equal(lc.t, 0, res.Status, "node %d's script:\n%s", i, consoleTail(res.Console, 30))
	}
	lc.t.Logf("guests stopped after %v", time.Since(lc.start).Round(time.Second))
}

// liveWriter writes random regions of the origin through one node, one
// request at a time, logging each write in a cutcheck.History.
type liveWriter struct {
	warm chan struct{} // closed once liveWarm writes were acknowledged, or the writer ended
	done chan struct{} // closed when the writer ended; err is set before
	err  error         // the write that failed, nil if none
}

// liveCut is where the writers are relative to the snapshot's creation.
type liveCut struct {
	begun, done atomic.Bool  // set after CutBegins, after CutEnds
	acked       atomic.Int64 // writes acknowledged between the two
}

// run writes until liveAfter writes were acknowledged after cut.done
// turned true, or a write fails.
func (w *liveWriter) run(ctx context.Context, cl *clusterload.Client, h *cutcheck.History, cut *liveCut, rng *rand.Rand) {
	warmed := sync.OnceFunc(func() { close(w.warm) })
	defer close(w.done)
	defer warmed()
	defer cl.Close()
	buf := make([]byte, liveRegionBytes)
	for n, after := 1, 0; n <= 100000 && after < liveAfter; n++ {
		r := rng.IntN(liveOriginBytes / liveRegionBytes)
		if err := h.Write(r, buf, func(p []byte, off int64) error {
			rctx, cancel := context.WithTimeout(ctx, requestTimeout)
			defer cancel()
			return cl.Write(rctx, uint64(off), p)
		}); err != nil {
			w.err = fmt.Errorf("region %d: %w", r, err)
			return
		}
		if n == liveWarm {
			warmed()
		}
		switch {
		case cut.done.Load():
			after++
		case cut.begun.Load():
			cut.acked.Add(1)
		}
	}
}
