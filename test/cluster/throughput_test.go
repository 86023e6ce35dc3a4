package cluster

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/test/clusterload"
	"github.com/clustersnap/clustersnap/test/guest"
	"github.com/clustersnap/clustersnap/volumes"
)

// The layout of TestClusterThroughput, in blocks of clusterload.BlockSize, with the
// COW's chunks of clusterload.ChunkBytes.
// measureEnv, set to 1, runs the measurements.
const measureEnv = "CLUSTERSNAP_MEASURE"

const (
	tputOriginBlocks = 32768 // 128 MiB
	tputCOWSize      = 160 << 20
	tputChunks       = tputOriginBlocks / clusterload.BlocksPerChunk
	// The bare run's origin writes go to chunks [0, tputChunks/2), the
	// cluster run's to the rest, node i's to every third from
	// tputChunks/2+i-1: every write is the first to its chunk, so every
	// one copies a chunk to the COW.
	tputBareChunks = tputChunks / 2
	// tputDuration is how long each run drives its workload.
	tputDuration = 8 * time.Second
	// tputRequestTimeout bounds one NBD request.
	tputRequestTimeout = 30 * time.Second
)

// Markers and control words of TestClusterThroughput's guests. The host
// writes a control word, one line, at the start of the control disk
// (/dev/vdc), which every guest polls.
const (
	bareServingMarker = "@@snapd-bare-serving node=1@@"
	// bareStoppedPrefix is followed by the bare snapd's exit status, then
	// "@@".
	bareStoppedPrefix = "@@snapd-bare-stopped node=1 rc="
	// ctlBareDone tells node 1 to stop its bare snapd.
	ctlBareDone = "bare-done"
	// ctlCluster tells every node to serve as a cluster member.
	ctlCluster = "cluster"
)

// throughputScript runs on guest i: node 1 first serves the origin and
// the snapshot alone, without --cluster-id (with O_DIRECT, as the
// cluster's nodes open them), until the host writes ctlBareDone, and
// stops it; then every node waits for ctlCluster and serves as
// serveScript does. Nodes 2 and 3 are idle DLM members meanwhile.
func throughputScript(i int) string {
	before := `t=0
until [ -b /dev/vdc ]; do
	t=$((t + 1)); [ $t -le 300 ] || { echo "the control disk did not appear"; exit 1; }
	sleep 0.1
done
ctl() { dd if=/dev/vdc bs=512 count=1 iflag=direct status=none | head -n 1; }
`
	if i == 1 {
		before += fmt.Sprintf(`snapd serve --origin /dev/vda --snapshot snap=/dev/vdb --direct --listen 0.0.0.0:%[1]d >/tmp/snapd-bare.log 2>&1 &
bpid=$!
t=0
until grep -q '^serving:' /tmp/snapd-bare.log; do
	kill -0 $bpid 2>/dev/null || { cat /tmp/snapd-bare.log; echo "the bare snapd exited"; exit 1; }
	t=$((t + 1)); [ $t -le 600 ] || { cat /tmp/snapd-bare.log; echo "the bare snapd does not serve"; exit 1; }
	sleep 0.2
done
echo "%[2]s"
t=0
until [ "$(ctl)" = "%[3]s" ]; do
	kill -0 $bpid 2>/dev/null || { cat /tmp/snapd-bare.log; echo "the bare snapd exited"; exit 1; }
	t=$((t + 1)); [ $t -le 1500 ] || { echo "the host never ended the bare run"; exit 1; }
	sleep 0.2
done
kill -TERM $bpid
rc=0; wait $bpid || rc=$?
cat /tmp/snapd-bare.log
echo "%[4]s$rc@@"
`, nbdPort, bareServingMarker, ctlBareDone, bareStoppedPrefix)
	}
	before += fmt.Sprintf(`t=0
until [ "$(ctl)" = "%s" ]; do
	t=$((t + 1)); [ $t -le 3000 ] || { echo "the host never started the cluster run"; exit 1; }
	sleep 0.2
done
`, ctlCluster)
	return serveScriptAround(i, before, "")
}

// setControl writes word as the first line of the control disk at path.
// The guests read it with O_DIRECT through QEMU's cache=none, which the
// host kernel keeps coherent with this buffered write.
func setControl(t *testing.T, path, word string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	require.NoError(t, err)
	defer f.Close()
	block := make([]byte, 512)
	copy(block, word+"\n")
	_, err = f.WriteAt(block, 0)
	require.NoError(t, err, "control disk %s", path)
	require.NoError(t, f.Sync(), "control disk %s", path)
}

// tputRun is one run of the throughput workload: on each node it
// drives, one origin writer (one connection, one request at a time) that
// writes the first block of fresh chunks, flushing every clusterload.FlushEvery
// writes, and one snapshot reader of random clusterload.ReadBlocks ranges that must
// read the original content. Only requests completed before the
// deadline count.
type tputRun struct {
	h        *clusterload.History
	deadline time.Time

	mu        sync.Mutex
	writes    [nodes + 1]int
	reads     [nodes + 1]int
	flushes   [nodes + 1]int
	exhausted [nodes + 1]bool // the writer ran out of fresh chunks before the deadline
	problems  []string
}

func (r *tputRun) problem(format string, args ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.problems = append(r.problems, fmt.Sprintf(format, args...))
}

// count adds one to counter if the request it counts completed before
// the deadline.
func (r *tputRun) count(counter *[nodes + 1]int, i int) {
	if time.Now().Before(r.deadline) {
		r.mu.Lock()
		counter[i]++
		r.mu.Unlock()
	}
}

// writer writes chunks' first blocks through c (node i's origin) until
// the deadline or the chunks run out, then flushes.
func (r *tputRun) writer(ctx context.Context, c *clusterload.Client, i int, chunks []int) {
	var pending []*clusterload.WriteRec
	flush := func() bool {
		rctx, cancel := context.WithTimeout(ctx, tputRequestTimeout)
		defer cancel()
		if err := c.Flush(rctx); err != nil {
			r.problem("node %d: origin flush: %v", i, err)
			return false
		}
		r.h.Flushed(pending)
		pending = nil
		return true
	}
	ranOut := true
	for k, chunk := range chunks {
		if !time.Now().Before(r.deadline) {
			ranOut = false
			break
		}
		block := int64(chunk * clusterload.BlocksPerChunk)
		rec := r.h.Send(clusterload.ToOrigin, block, clusterload.Value{Kind: clusterload.ToOrigin, Node: uint8(i), Seq: uint32(k + 1)})
		rctx, cancel := context.WithTimeout(ctx, tputRequestTimeout)
		err := c.Write(rctx, uint64(block)*clusterload.BlockSize, clusterload.EncodeBlock(rec.V, block))
		cancel()
		if err != nil {
			r.problem("node %d: origin write to block %d: %v", i, block, err)
			return
		}
		r.h.Ack(rec)
		pending = append(pending, rec)
		r.count(&r.writes, i)
		if len(pending) == clusterload.FlushEvery {
			if !flush() {
				return
			}
			r.count(&r.flushes, i)
		}
	}
	if ranOut && time.Now().Before(r.deadline) {
		r.mu.Lock()
		r.exhausted[i] = true
		r.mu.Unlock()
	}
	flush()
}

// reader reads random ranges of node i's snapshot through c until the
// deadline; every block must hold the original content.
func (r *tputRun) reader(ctx context.Context, c *clusterload.Client, i int, rng *rand.Rand) {
	for time.Now().Before(r.deadline) {
		first := int64(rng.IntN(tputOriginBlocks - clusterload.ReadBlocks + 1))
		rctx, cancel := context.WithTimeout(ctx, tputRequestTimeout)
		data, err := c.Read(rctx, uint64(first)*clusterload.BlockSize, clusterload.ReadBlocks*clusterload.BlockSize)
		cancel()
		if err != nil {
			r.problem("node %d: snapshot read at block %d: %v", i, first, err)
			return
		}
		for k := range int64(clusterload.ReadBlocks) {
			b := first + k
			if v, ok := clusterload.DecodeBlock(data[k*clusterload.BlockSize:(k+1)*clusterload.BlockSize], b); !ok || v != clusterload.Pristine {
				r.problem("node %d: snapshot block %d reads %v (decoded: %v), not the original content", i, b, v, ok)
				return
			}
		}
		r.count(&r.reads, i)
	}
}

// runThroughput drives the workload for tputDuration against the nodes
// in chunks (node id to its fresh chunks) and returns what completed.
// It connects to every node before the clock starts.
func runThroughput(ctx context.Context, t *testing.T, h *clusterload.History, addrs []string, chunks map[int][]int, seed uint64) *tputRun {
	t.Helper()
	type conns struct{ origin, snap *clusterload.Client }
	cs := map[int]conns{}
	for i := range chunks {
		o, err := clusterload.Dial(ctx, "tcp", addrs[i], volumes.OriginExport)
		require.NoError(t, err, "node %d", i)
		s, err := clusterload.Dial(ctx, "tcp", addrs[i], "snap")
		require.NoError(t, err, "node %d", i)
		cs[i] = conns{o, s}
	}
	r := &tputRun{h: h, deadline: time.Now().Add(tputDuration)}
	var wg sync.WaitGroup
	for i, cc := range cs {
		wg.Go(func() { r.writer(ctx, cc.origin, i, chunks[i]) })
		wg.Go(func() { r.reader(ctx, cc.snap, i, rand.New(rand.NewPCG(seed, uint64(i)))) })
	}
	wg.Wait()
	for _, cc := range cs {
		cc.origin.Close()
		cc.snap.Close()
	}
	return r
}

// TestClusterThroughput measures, on the three guests of the other
// tests, what the cluster costs: first node 1 alone serves the origin
// and the snapshot without --cluster-id (the other two are idle DLM
// members) while the host writes fresh chunks of the origin (each write
// copies a chunk) and reads the snapshot for tputDuration; then all
// three serve as cluster members (--lock dlm) and the host drives the
// same workload on every node, on disjoint fresh chunks, for as long.
// It logs the acknowledged requests of both runs, per node, and their
// ratio; it asserts only that both runs completed requests, none failed,
// every snapshot read returned the original content, and the final
// images hold every acknowledged write with a clean COW whose snapshot
// is the original origin.
//
// It is a measurement, not a check the other tests lack (TestClusterKills
// checks the same images under a heavier workload), so it runs only with
// CLUSTERSNAP_MEASURE=1: two minutes of CI for figures nobody reads there.
func TestClusterThroughput(t *testing.T) {
	if os.Getenv(measureEnv) != "1" {
		t.Skipf("a measurement: set %s=1 to run it", measureEnv)
	}
	r := clusterInitramfs(t)
	ctx, cancel := context.WithTimeout(t.Context(), 6*time.Minute)
	defer cancel()

	dir := t.TempDir()
	tc := &testCluster{origin: filepath.Join(dir, "origin.img"), cow: filepath.Join(dir, "cow.img")}
	control := filepath.Join(dir, "control.img")
	pristineOrigin := clusterload.PristineImage(tputOriginBlocks)
	require.NoError(t, os.WriteFile(tc.origin, pristineOrigin, 0o600))
	require.NoError(t, os.WriteFile(control, make([]byte, 1<<20), 0o600))
	require.NoError(t, blockdev.Create(tc.cow, tputCOWSize))
	clusterload.FormatCOW(t, tc.cow, clusterload.ChunkBytes)

	addrs := make([]string, nodes+1)
	ports := make([]int, nodes+1)
	for i := 1; i <= nodes; i++ {
		ports[i] = freePort(t)
		addrs[i] = fmt.Sprintf("127.0.0.1:%d", ports[i])
	}
	start := time.Now()
	c, err := guest.StartDLMCluster(ctx, r, guest.DLMClusterOptions{
		Nodes:     nodes,
		MemoryMiB: 768,
		QEMUArgs: func(i int) []string {
			return append(sharedDisks(tc.origin, tc.cow, control), forwardArgs(i, ports[i])...)
		},
		Script:  throughputScript,
		Console: consoleFiles(t),
	})
	require.NoError(t, err)
	t.Cleanup(c.Close)
	tc.c = c
	waitMarker := func(i int, marker string) {
		t.Helper()
		if err := c.Machine(i).WaitConsole(ctx, marker); err != nil {
			t.Fatalf("node %d: %v", i, err)
		}
	}
	waitMarker(1, bareServingMarker)
	t.Logf("node 1 serving alone after %v", time.Since(start).Round(time.Second))

	h := clusterload.NewHistory()
	bareChunks := make([]int, tputBareChunks)
	for k := range bareChunks {
		bareChunks[k] = k
	}
	bare := runThroughput(ctx, t, h, addrs, map[int][]int{1: bareChunks}, 1)
	require.Empty(t, bare.problems, "the bare run saw these")

	setControl(t, control, ctlBareDone)
	waitMarker(1, bareStoppedPrefix)
	require.Contains(t, c.Machine(1).Console(), bareStoppedPrefix+"0@@", "the bare snapd's exit status:\n%s", consoleTail(c.Machine(1).Console(), 20))
	clusterStart := time.Now()
	setControl(t, control, ctlCluster)
	for i := 1; i <= nodes; i++ {
		waitMarker(i, servingMarker(i))
	}
	t.Logf("three clustered nodes serving %v after the bare run", time.Since(clusterStart).Round(100*time.Millisecond))

	clusterChunks := map[int][]int{}
	for ch := tputBareChunks; ch < tputChunks; ch++ {
		i := (ch-tputBareChunks)%nodes + 1
		clusterChunks[i] = append(clusterChunks[i], ch)
	}
	clustered := runThroughput(ctx, t, h, addrs, clusterChunks, 2)
	require.Empty(t, clustered.problems, "the cluster run saw these")

	logThroughput(t, bare, clustered)
	// Each node's lock conversions, from a status line printed after the
	// run: they count from the node's start, which was just before it.
	for i := 1; i <= nodes; i++ {
		m := c.Machine(i)
		if err := waitStatus(ctx, m, i, statusCount(m.Console(), i)+1); err != nil {
			t.Logf("node %d: no status after the run: %v", i, err)
			continue
		}
		st, ok := lastStatus(m.Console(), i)
		if !ok || len(st.Snapshots) == 0 || st.Snapshots[0].Cluster == nil {
			t.Logf("node %d: no status with cluster counters", i)
			continue
		}
		cc := st.Snapshots[0].Cluster
		conv := cc.UpConverts + cc.DownConverts
		t.Logf("figures cluster node %d: %d lock conversions, %.1f per origin write, %.1f per request",
			i, conv, float64(conv)/float64(max(clustered.writes[i], 1)), float64(conv)/float64(max(clustered.writes[i]+clustered.reads[i], 1)))
	}
	assert.Positive(t, bare.writes[1], "origin writes acknowledged by the bare node")
	assert.Positive(t, bare.reads[1], "snapshot reads by the bare node")
	for i := 1; i <= nodes; i++ {
		assert.Positive(t, clustered.writes[i], "origin writes acknowledged by node %d in the cluster", i)
		assert.Positive(t, clustered.reads[i], "snapshot reads by node %d in the cluster", i)
	}
	c.Close()
	t.Logf("guests done after %v", time.Since(start).Round(time.Second))

	// Every write was acknowledged and flushed: the origin holds each,
	// and the snapshot is the original origin.
	finalOrigin, view, _ := clusterload.FinalImages(ctx, t, tc.origin, tc.cow)
	clusterload.CheckImages(t, h, finalOrigin, view)
}

// logThroughput logs both runs' counts and the cluster's over the bare
// node's: per node and in all.
func logThroughput(t *testing.T, bare, clustered *tputRun) {
	t.Helper()
	sum := func(a [nodes + 1]int) int { return a[1] + a[2] + a[3] }
	ratio := func(a, b int) string { return fmt.Sprintf("%.2f", float64(a)/float64(max(b, 1))) }
	secs := tputDuration.Seconds()
	var capped []string
	for _, run := range []struct {
		name string
		r    *tputRun
	}{{"bare", bare}, {"cluster", clustered}} {
		for i := 1; i <= nodes; i++ {
			if run.r.exhausted[i] {
				capped = append(capped, fmt.Sprintf("%s node %d", run.name, i))
			}
		}
	}
	if len(capped) > 0 {
		t.Logf("figures: these writers ran out of fresh chunks, their counts are lower bounds: %s", strings.Join(capped, ", "))
	}
	bw, br := bare.writes[1], bare.reads[1]
	t.Logf("figures bare (node 1 alone, no --cluster-id) in %v: %d origin writes (%.1f/s, each copying a chunk), %d flushes, %d snapshot reads of %d KiB (%.1f/s); %d requests",
		tputDuration, bw, float64(bw)/secs, bare.flushes[1], br, clusterload.ReadBlocks*clusterload.BlockSize>>10, float64(br)/secs, bw+br)
	for i := 1; i <= nodes; i++ {
		w, rd := clustered.writes[i], clustered.reads[i]
		t.Logf("figures cluster node %d in %v: %d origin writes (%s of the bare node's), %d flushes, %d snapshot reads (%s of the bare node's)",
			i, tputDuration, w, ratio(w, bw), clustered.flushes[i], rd, ratio(rd, br))
	}
	cw, cr := sum(clustered.writes), sum(clustered.reads)
	t.Logf("figures cluster (3 nodes) / bare (1 node): origin writes %d / %d = %s, snapshot reads %d / %d = %s, requests %d / %d = %s",
		cw, bw, ratio(cw, bw), cr, br, ratio(cr, br), cw+cr, bw+br, ratio(cw+cr, bw+br))
}
