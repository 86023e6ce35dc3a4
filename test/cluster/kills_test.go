package cluster

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
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
	"github.com/clustersnap/clustersnap/persistent"
	"github.com/clustersnap/clustersnap/test/guest"
	"github.com/clustersnap/clustersnap/volumes"
)

// The layout of TestClusterKills, in blocks of blockSize.
const (
	killOriginBlocks = 4096 // 16 MiB
	killCOWSize      = 40 << 20
	// killChunkBytes is the COW's chunk: four blocks, written by
	// different nodes, so that nodes race to copy one chunk.
	killChunkBytes = 16 << 10
	blocksPerChunk = killChunkBytes / blockSize
	// Origin writes go to blocks [0, originWritten); block b belongs to
	// node b%3+1. The rest of the origin keeps its original content.
	originWritten = 3072
	// Node i writes the snapshot's blocks [snapBase+(i-1)*snapPerNode,
	// snapBase+i*snapPerNode): whole chunks, disjoint between nodes, that
	// the origin writes also reach.
	snapBase    = 2048
	snapPerNode = 256
	// flushEvery is how many acknowledged writes a writer sends between
	// flushes.
	flushEvery = 8
	// phaseWrites is how many origin writes every serving node must have
	// acknowledged between two events (start, kill, rejoin).
	phaseWrites = 24
	// readBlocks is the length of a snapshot read, in blocks.
	readBlocks = 16
	// requestTimeout bounds one NBD request; a survivor's request waits
	// for the DLM's recovery from a node's death (about 25 s here).
	requestTimeout = 2 * time.Minute
)

// killEnv returns the seed and the number of kills of a run: seed 18 and
// two kills unless CLUSTERSNAP_SEED and CLUSTERSNAP_SOAK_KILLS say
// otherwise.
func killEnv(t *testing.T) (uint64, int) {
	seed, kills := uint64(18), 2
	if s := os.Getenv("CLUSTERSNAP_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 10, 64)
		require.NoError(t, err, "CLUSTERSNAP_SEED")
		seed = v
	}
	if s := os.Getenv("CLUSTERSNAP_SOAK_KILLS"); s != "" {
		v, err := strconv.Atoi(s)
		require.NoError(t, err, "CLUSTERSNAP_SOAK_KILLS")
		require.Positive(t, v, "CLUSTERSNAP_SOAK_KILLS")
		kills = v
	}
	return seed, kills
}

// nodeLink is the host's view of whether node i serves: workers connect
// only while up is closed. The test opens a new up before it kills the
// node and closes it once the rebooted node serves again.
type nodeLink struct {
	addr string
	mu   sync.Mutex
	up   chan struct{}
	gen  int // incarnation: 0 from the first boot, +1 per kill
}

func (n *nodeLink) state() (<-chan struct{}, int) {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.up, n.gen
}

func (n *nodeLink) down() {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.up = make(chan struct{})
	n.gen++
}

func (n *nodeLink) serving() {
	n.mu.Lock()
	defer n.mu.Unlock()
	close(n.up)
}

// workload is the concurrent load of TestClusterKills and what it saw.
type workload struct {
	seed  uint64
	h     *history
	links []*nodeLink // by node id; [0] unused
	stop  chan struct{}
	order []int        // the chunks origin writers walk
	turn  atomic.Int64 // origin writes that walked order so far

	mu        sync.Mutex
	running   chan struct{}  // closed while the workers may send requests
	changed   chan struct{}  // closed and replaced when the counters move
	acked     [nodes + 1]int // origin writes acknowledged per node
	ackedGen  [nodes + 1]int // writes (both devices) acknowledged by the node's current incarnation
	originGen [nodes + 1]int // of them, origin writes
	failed    [nodes + 1]int // writes that failed or were in flight when a node died
	flushes   int
	reads     int // snapshot reads checked
	checks    int // snapshot blocks checked
	problems  []string
}

func (w *workload) note(f func()) {
	w.mu.Lock()
	defer w.mu.Unlock()
	f()
	close(w.changed)
	w.changed = make(chan struct{})
}

func (w *workload) problem(format string, args ...any) {
	w.note(func() { w.problems = append(w.problems, fmt.Sprintf(format, args...)) })
}

// pause holds the workers before their next request; resume lets them
// go on.
func (w *workload) pause() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.running = make(chan struct{})
}

func (w *workload) resume() {
	w.mu.Lock()
	defer w.mu.Unlock()
	close(w.running)
}

// proceed waits until the workers may send a request, and reports false
// when the workload stops instead.
func (w *workload) proceed(ctx context.Context) bool {
	w.mu.Lock()
	running := w.running
	w.mu.Unlock()
	select {
	case <-running:
	case <-w.stop:
		return false
	case <-ctx.Done():
		return false
	}
	select {
	case <-w.stop:
		return false
	default:
		return true
	}
}

// failing reports whether the workload saw a problem.
func (w *workload) failing() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.problems) > 0
}

// waitAcked waits until node i has had min origin writes acknowledged.
func (w *workload) waitAcked(ctx context.Context, i, min int) error {
	for {
		w.mu.Lock()
		n, ch, bad := w.acked[i], w.changed, len(w.problems)
		w.mu.Unlock()
		if n >= min {
			return nil
		}
		if bad > 0 {
			return fmt.Errorf("node %d: %d origin writes acknowledged, waiting for %d, but the workload failed", i, n, min)
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("node %d: %d origin writes acknowledged, waiting for %d: %w", i, n, min, ctx.Err())
		}
	}
}

func (w *workload) ackedNow() [nodes + 1]int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.acked
}

// connect returns a connection to export on node i once it serves, with
// the node's incarnation it was made to, or nil when the workload stops.
// A node that serves must accept.
func (w *workload) connect(ctx context.Context, i int, export string) (*nbdClient, int) {
	for {
		up, gen := w.links[i].state()
		select {
		case <-up:
		case <-w.stop:
			return nil, 0
		case <-ctx.Done():
			return nil, 0
		}
		c, err := dialNBD(ctx, w.links[i].addr, export)
		if err == nil {
			return c, gen
		}
		if _, now := w.links[i].state(); now == gen {
			w.problem("node %d serves but refuses %s: %v", i, export, err)
			return nil, 0
		}
	}
}

// failedOnDeadNode tells whether a request to node i that failed in
// incarnation gen failed because the test killed the node: otherwise it
// is a problem.
func (w *workload) failedOnDeadNode(i, gen int, what string, err error) bool {
	if _, now := w.links[i].state(); now != gen {
		return true
	}
	w.problem("node %d %s failed while it serves: %v", i, what, err)
	return false
}

// writer writes t on node i until the workload stops, flushing every
// flushEvery acknowledged writes and once at the end.
func (w *workload) writer(ctx context.Context, i int, t target) {
	rng := rand.New(rand.NewPCG(w.seed, uint64(i)<<8|uint64(t)))
	export := volumes.OriginExport
	if t == toSnapshot {
		export = "snap"
	}
	var seq uint32
	var mine []int64 // origin blocks this writer wrote
	next := func() int64 {
		if t == toSnapshot {
			return int64(snapBase + (i-1)*snapPerNode + rng.IntN(snapPerNode))
		}
		if len(mine) > 0 && rng.IntN(4) == 0 {
			return mine[rng.IntN(len(mine))]
		}
		// Three turns in a row, taken by whichever writers come, go to
		// one chunk not written before, each to a block of it the writer
		// owns: nodes race to copy the chunk, and every few writes need
		// a new exception (and the cluster's locks).
		chunk := w.order[int(w.turn.Add(1)-1)/nodes%len(w.order)]
		var own []int64
		for b := int64(chunk * blocksPerChunk); b < int64((chunk+1)*blocksPerChunk); b++ {
			if int(b%nodes)+1 == i {
				own = append(own, b)
			}
		}
		b := own[rng.IntN(len(own))]
		mine = append(mine, b)
		return b
	}
	for {
		c, gen := w.connect(ctx, i, export)
		if c == nil {
			return
		}
		var pending []*writeRec
		for {
			if !w.proceed(ctx) {
				rctx, cancel := context.WithTimeout(ctx, requestTimeout)
				err := c.flush(rctx)
				cancel()
				if err == nil {
					w.h.flushed(pending)
				} else {
					w.failedOnDeadNode(i, gen, "final flush", err)
				}
				c.Close()
				return
			}
			block := next()
			seq++
			r := w.h.send(t, block, value{kind: t, node: uint8(i), seq: seq})
			rctx, cancel := context.WithTimeout(ctx, requestTimeout)
			err := c.write(rctx, uint64(block)*blockSize, encodeBlock(r.v, block))
			if err == nil && len(pending)+1 == flushEvery {
				w.h.ack(r)
				pending = append(pending, r)
				if err = c.flush(rctx); err == nil {
					w.h.flushed(pending)
					pending = nil
					w.note(func() { w.flushes++ })
				}
			} else if err == nil {
				w.h.ack(r)
				pending = append(pending, r)
			}
			cancel()
			if err != nil {
				w.note(func() { w.failed[i]++ })
				w.failedOnDeadNode(i, gen, fmt.Sprintf("%v write", t), err)
				break
			}
			w.note(func() {
				if t == toOrigin {
					w.acked[i]++
				}
				if _, now := w.links[i].state(); now == gen {
					w.ackedGen[i]++
					if t == toOrigin {
						w.originGen[i]++
					}
				}
			})
		}
		c.Close()
		if w.failing() {
			return
		}
	}
}

// reader reads the snapshot on node i until the workload stops, checking
// every block: the original content, or a snapshot write sent to it.
func (w *workload) reader(ctx context.Context, i int) {
	rng := rand.New(rand.NewPCG(w.seed, uint64(i)<<8|0xff))
	for {
		c, gen := w.connect(ctx, i, "snap")
		if c == nil {
			return
		}
		for {
			if !w.proceed(ctx) {
				c.Close()
				return
			}
			first := int64(rng.IntN(killOriginBlocks - readBlocks + 1))
			rctx, cancel := context.WithTimeout(ctx, requestTimeout)
			data, err := c.read(rctx, uint64(first)*blockSize, readBlocks*blockSize)
			cancel()
			if err != nil {
				w.failedOnDeadNode(i, gen, "snapshot read", err)
				break
			}
			bad := 0
			for k := range int64(readBlocks) {
				b := first + k
				v, ok := decodeBlock(data[k*blockSize:(k+1)*blockSize], b)
				if !ok || !w.h.readable(toSnapshot, b, v) {
					bad++
					if bad == 1 {
						w.problem("node %d: snapshot block %d reads %v (decoded: %v): neither the original nor a snapshot write to it", i, b, v, ok)
					}
				}
			}
			w.note(func() { w.reads++; w.checks += readBlocks })
			if bad > 0 {
				break
			}
		}
		c.Close()
		if w.failing() {
			return
		}
	}
}

// TestClusterKills: three guests serve one origin and its snapshot from
// shared disks with snapd serve --lock dlm while the host writes the
// origin (nodes racing to copy the same chunks), writes disjoint ranges
// of the snapshot and reads the snapshot on every node, checking every
// block it reads. One guest's QEMU is killed mid-workload; the survivors
// go on after the DLM's recovery; the killed guest boots again, its
// snapd rejoins and serves; then another guest is killed (2 kills, or
// CLUSTERSNAP_SOAK_KILLS). Afterwards every flushed write is on the
// images, no block holds anything nobody wrote, the COW passes the
// checker, and the kernel's dm-snapshot reads the snapshot exactly as the
// cluster's COW holds it.
func TestClusterKills(t *testing.T) {
	seed, kills := killEnv(t)
	t.Logf("seed %d (CLUSTERSNAP_SEED), %d kills (CLUSTERSNAP_SOAK_KILLS)", seed, kills)
	rng := rand.New(rand.NewPCG(seed, 0))
	r := clusterInitramfs(t)
	ctx, cancel := context.WithTimeout(t.Context(), time.Duration(6+3*kills)*time.Minute)
	defer cancel()
	tc := startTestCluster(ctx, t, r, seed, serveScript)
	c, w, start := tc.c, tc.w, tc.start
	origin, cow, dump := tc.origin, tc.cow, tc.dump

	var wg sync.WaitGroup
	for i := 1; i <= nodes; i++ {
		wg.Go(func() { w.writer(ctx, i, toOrigin) })
		wg.Go(func() { w.writer(ctx, i, toSnapshot) })
		wg.Go(func() { w.reader(ctx, i) })
	}
	stopped := false
	stopWorkload := func() {
		if !stopped {
			stopped = true
			close(w.stop)
			wg.Wait()
		}
	}
	defer stopWorkload()
	fail := func(format string, args ...any) {
		stopWorkload()
		w.mu.Lock()
		problems := w.problems
		w.mu.Unlock()
		for i := 1; i <= nodes; i++ {
			t.Logf("node %d console tail:\n%s", i, consoleTail(c.Machine(i).Console(), 40))
		}
		t.Fatalf("%s; workload problems: %q", fmt.Sprintf(format, args...), problems)
	}
	waitAll := func(base [nodes + 1]int, more int, except int) {
		for i := 1; i <= nodes; i++ {
			if i == except {
				continue
			}
			if err := w.waitAcked(ctx, i, base[i]+more); err != nil {
				fail("%v", err)
			}
		}
	}
	waitAll([nodes + 1]int{}, phaseWrites, 0)
	victim := 0
	for k := 1; k <= kills; k++ {
		victim = (victim+rng.IntN(nodes-1))%nodes + 1 // never the previous victim
		// Each node's count of recoveries as of a line printed now.
		recovered := make([]int, nodes+1)
		for i := 1; i <= nodes; i++ {
			m := c.Machine(i)
			if err := waitStatus(ctx, m, i, statusCount(m.Console(), i)+1); err != nil {
				fail("node %d: %v", i, err)
			}
			recovered[i] = recoveries(m.Console(), i)
		}
		w.links[victim].down()
		w.note(func() { w.ackedGen[victim], w.originGen[victim] = 0, 0 })
		killed := time.Now()
		c.Kill(victim)
		// A survivor may go on without the DLM for a while on the locks
		// it holds; what counts is that it goes on after the kernel
		// recovered the lockspace without the victim.
		for i := 1; i <= nodes; i++ {
			if i == victim {
				continue
			}
			if err := waitRecovery(ctx, c.Machine(i), i, recovered[i]+1); err != nil {
				fail("node %d after node %d's death: %v", i, victim, err)
			}
		}
		t.Logf("kill %d: node %d killed; the survivors' lockspace recovered %v later", k, victim, time.Since(killed).Round(100*time.Millisecond))
		base := w.ackedNow()
		waitAll(base, phaseWrites, victim)
		t.Logf("kill %d: the survivors acknowledged %d more origin writes each %v after the kill", k, phaseWrites, time.Since(killed).Round(100*time.Millisecond))
		// The survivors rest while the victim boots until its corosync
		// is quorate: booting a guest while the other two run the
		// workload starved their corosync on two host CPUs under TCG, and
		// they lost the lockspace (see the package README). They go on
		// while the victim's snapd joins the lockspace.
		w.pause()
		rebooted := time.Now()
		if err := c.Reboot(ctx, victim); err != nil {
			fail("node %d's reboot: %v", victim, err)
		}
		w.resume()
		if err := c.Machine(victim).WaitConsole(ctx, servingMarker(victim)); err != nil {
			fail("node %d after its reboot: %v", victim, err)
		}
		w.links[victim].serving()
		base = w.ackedNow()
		waitAll(base, phaseWrites, 0)
		t.Logf("kill %d: node %d rejoined and served %v after its boot began; every node acknowledged %d more origin writes", k, victim, time.Since(rebooted).Round(100*time.Millisecond), phaseWrites)
	}

	// The figures, from every node's snapd before it stops: a status line
	// printed after the workload ended.
	statusBefore := make([]int, nodes+1)
	for i := 1; i <= nodes; i++ {
		statusBefore[i] = statusCount(c.Machine(i).Console(), i)
	}
	stopWorkload()
	for i := 1; i <= nodes; i++ {
		if err := waitStatus(ctx, c.Machine(i), i, statusBefore[i]+1); err != nil {
			t.Logf("node %d: no status after the workload: %v", i, err)
		}
	}
	logFigures(t, w, c)
	c.Close()
	w.mu.Lock()
	t.Logf("workload: %d origin writes acknowledged per node %v, %d failed on killed nodes %v, %d flushes completed; %d snapshot reads checked %d blocks",
		w.acked[1]+w.acked[2]+w.acked[3], w.acked[1:], w.failed[1]+w.failed[2]+w.failed[3], w.failed[1:], w.flushes, w.reads, w.checks)
	problems := w.problems
	w.mu.Unlock()
	require.Empty(t, problems, "the workload saw these")
	t.Logf("workload and kills done after %v", time.Since(start).Round(time.Second))

	// The images, quiescent: the COW is clean, the origin holds every
	// flushed write, and the snapshot view every flushed snapshot write
	// over the original origin.
	finalOrigin, view := finalImages(ctx, t, tc)
	checkImages(t, w.h, finalOrigin, view)

	// The kernel's dm-snapshot on the same images, in a fresh guest.
	res := guest.Boot(ctx, t, r, guest.Options{Script: fmt.Sprintf(`set -e
SZ=$(blockdev --getsz /dev/vda)
dmsetup create snap --table "0 $SZ snapshot /dev/vda /dev/vdb P %d"
dmsetup mknodes
st=$(dmsetup status snap); echo "result status $st"
dd if=/dev/mapper/snap of=/dev/vdc bs=1M iflag=direct oflag=direct status=none
dmsetup remove snap
`, killChunkBytes/512), Disks: []guest.Disk{{Path: origin}, {Path: cow}, {Path: dump}}})
	status := guest.Results(res.Output)["status"]
	t.Logf("the kernel's dm-snapshot: %s", status)
	require.NotContains(t, status, "Invalid")
	kernelView, err := os.ReadFile(dump)
	require.NoError(t, err)
	if !bytes.Equal(view, kernelView) {
		var differ []int
		for b := range killOriginBlocks {
			if !bytes.Equal(view[b*blockSize:(b+1)*blockSize], kernelView[b*blockSize:(b+1)*blockSize]) {
				differ = append(differ, b)
			}
		}
		t.Errorf("the kernel's snapshot view differs from the COW's in %d blocks, the first: %v", len(differ), differ[:min(len(differ), 10)])
	}
	t.Logf("done after %v", time.Since(start).Round(time.Second))
}

// clusterInitramfs is the guests' initramfs: the DLM cluster's, snapd,
// dm-snapshot and dmsetup for the kernel's check, the nbd driver,
// mkfs.ext4 and e2fsck for a kernel client of a node's export.
func clusterInitramfs(t *testing.T) *guest.Initramfs {
	snapd := guest.BuildStatic(t, "github.com/clustersnap/clustersnap/cmd/snapd")
	return guest.DLMSetup(t, guest.Config{
		Modules:  []string{"virtio_blk", "dm-snapshot", "nbd"},
		Binaries: []string{"dmsetup", "mkfs.ext4", "e2fsck"},
		Files:    map[string][]byte{"/bin/snapd": snapd},
	})
}

// testCluster is three guests serving the test's images, and the
// workload the host drives against them.
type testCluster struct {
	origin, cow, dump string // images; dump receives the kernel's snapshot view
	c                 *guest.DLMCluster
	w                 *workload
	start             time.Time
}

// startTestCluster makes the images (an origin of original blocks, a
// COW with killChunkBytes chunks), boots the cluster with script and
// waits until every node serves. The workload is ready, not started.
func startTestCluster(ctx context.Context, t *testing.T, r *guest.Initramfs, seed uint64, script func(i int) string) *testCluster {
	t.Helper()
	dir := t.TempDir()
	tc := &testCluster{origin: filepath.Join(dir, "origin.img"), cow: filepath.Join(dir, "cow.img"), dump: filepath.Join(dir, "dump.img")}
	pristineOrigin := make([]byte, killOriginBlocks*blockSize)
	for b := range int64(killOriginBlocks) {
		copy(pristineOrigin[b*blockSize:], encodeBlock(pristine, b))
	}
	require.NoError(t, os.WriteFile(tc.origin, pristineOrigin, 0o600))
	require.NoError(t, os.WriteFile(tc.dump, make([]byte, len(pristineOrigin)), 0o600))
	require.NoError(t, blockdev.Create(tc.cow, killCOWSize))
	formatCOW(t, tc.cow, killChunkBytes)

	w := &workload{seed: seed, h: newHistory(), links: make([]*nodeLink, nodes+1), stop: make(chan struct{}), changed: make(chan struct{}), running: make(chan struct{})}
	close(w.running)
	w.order = rand.New(rand.NewPCG(seed, 1)).Perm(originWritten / blocksPerChunk)
	ports := make([]int, nodes+1)
	for i := 1; i <= nodes; i++ {
		ports[i] = freePort(t)
		w.links[i] = &nodeLink{addr: fmt.Sprintf("127.0.0.1:%d", ports[i]), up: make(chan struct{})}
	}
	tc.w = w
	tc.start = time.Now()
	c, err := guest.StartDLMCluster(ctx, r, guest.DLMClusterOptions{
		Nodes:     nodes,
		MemoryMiB: 768,
		QEMUArgs: func(i int) []string {
			return append(sharedDisks(tc.origin, tc.cow), forwardArgs(i, ports[i])...)
		},
		Script:  script,
		Console: consoleFiles(t),
	})
	require.NoError(t, err)
	t.Cleanup(c.Close)
	tc.c = c
	for i := 1; i <= nodes; i++ {
		if err := c.Machine(i).WaitConsole(ctx, servingMarker(i)); err != nil {
			t.Fatalf("node %d: %v\n%s", i, err, c.Machine(i).Console())
		}
		w.links[i].serving()
	}
	t.Logf("three snapd nodes serving after %v", time.Since(tc.start).Round(time.Second))
	return tc
}

// finalImages checks the quiescent COW with persistent.Check and returns
// the origin image and the snapshot view the COW holds over it.
func finalImages(ctx context.Context, t *testing.T, tc *testCluster) (origin, view []byte) {
	t.Helper()
	dev, err := blockdev.Open(tc.cow, blockdev.Options{ReadOnly: true})
	require.NoError(t, err)
	defer dev.Close()
	report, err := persistent.Check(ctx, dev, nil)
	require.NoError(t, err)
	assert.True(t, report.OK(), "snapd check: %+v", report)
	store, err := persistent.Open(ctx, dev, persistent.Options{})
	require.NoError(t, err)
	defer store.Close()
	origin, err = os.ReadFile(tc.origin)
	require.NoError(t, err)
	return origin, snapshotView(ctx, t, store, dev, origin)
}

// checkImages checks the final origin image and snapshot view against h
// (checkFinal) and logs what was checked.
func checkImages(t *testing.T, h *history, origin, view []byte) {
	t.Helper()
	for _, d := range []struct {
		t   target
		img []byte
	}{{toOrigin, origin}, {toSnapshot, view}} {
		rep := h.checkFinal(d.t, d.img)
		t.Logf("%v: %d blocks checked, %d written, %d with a flushed write", d.t, rep.blocks, rep.written, rep.flushed)
		assert.Empty(t, rep.problems, "%v", d.t)
	}
}

// snapshotView is the snapshot as store and its cow device hold it over
// origin: the COW's chunk where the store has an exception.
func snapshotView(ctx context.Context, t *testing.T, store *persistent.Store, cow blockdev.Device, origin []byte) []byte {
	t.Helper()
	chunk := int64(store.ChunkSectors()) * 512
	view := bytes.Clone(origin)
	for c := int64(0); c*chunk < int64(len(view)); c++ {
		newChunk, found, release, err := store.Lookup(ctx, exstore.Chunk(c))
		if err == nil && found {
			_, err = cow.ReadAt(view[c*chunk:min((c+1)*chunk, int64(len(view)))], int64(newChunk)*chunk)
		}
		release()
		require.NoError(t, err, "chunk %d", c)
	}
	return view
}

// waitStatus waits until m's console holds node i's n-th status line.
func waitStatus(ctx context.Context, m *guest.Machine, i, n int) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	return m.WaitConsole(ctx, statusMarker(i, n))
}

// statusCount is how many status lines node i printed on console.
func statusCount(console string, i int) int {
	return strings.Count(console, statusPrefix(i))
}

// consoleFiles, when CLUSTERSNAP_CONSOLE_DIR names a directory, appends
// guest i's consoles (every boot) to node-i.console there.
func consoleFiles(t *testing.T) func(i int) io.Writer {
	dir := os.Getenv("CLUSTERSNAP_CONSOLE_DIR")
	if dir == "" {
		return nil
	}
	return func(i int) io.Writer {
		f, err := os.OpenFile(filepath.Join(dir, fmt.Sprintf("node-%d.console", i)), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
		require.NoError(t, err)
		t.Cleanup(func() { f.Close() })
		fmt.Fprintf(f, "\n==== boot at %s\n", time.Now().Format(time.TimeOnly))
		return f
	}
}

// recoveries is the last count of completed lockspace recoveries guest i
// printed on console (see recoveriesPrefix), 0 if none.
func recoveries(console string, i int) int {
	k := strings.LastIndex(console, recoveriesPrefix(i))
	if k < 0 {
		return 0
	}
	digits, _, _ := strings.Cut(console[k+len(recoveriesPrefix(i)):], "@@")
	n, _ := strconv.Atoi(digits)
	return n
}

// waitRecovery waits until guest i's console m shows n completed
// recoveries of snapd's lockspace. The console is polled: the guest
// prints the count every 3 s.
func waitRecovery(ctx context.Context, m *guest.Machine, i, n int) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for recoveries(m.Console(), i) < n {
		select {
		case <-tick.C:
		case <-m.Done():
			return errors.New("the guest exited")
		case <-ctx.Done():
			return fmt.Errorf("waiting for recovery %d of the lockspace (seen %d): %w", n, recoveries(m.Console(), i), ctx.Err())
		}
	}
	return nil
}

// consoleTail is the last n lines of a console.
func consoleTail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// lastStatus is node i's last status line on its console.
func lastStatus(console string, i int) (volumes.Status, bool) {
	var st volumes.Status
	k := strings.LastIndex(console, statusPrefix(i))
	if k < 0 {
		return st, false
	}
	line := console[strings.LastIndex(console[:k], "\n")+1 : k]
	return st, json.Unmarshal([]byte(line), &st) == nil
}

// logFigures logs each node's lock conversions per 1000 writes its
// current incarnation acknowledged (all, and origin writes only), and its
// metadata refreshes.
func logFigures(t *testing.T, w *workload, c *guest.DLMCluster) {
	t.Helper()
	w.mu.Lock()
	writes, originWrites := w.ackedGen, w.originGen
	w.mu.Unlock()
	for i := 1; i <= nodes; i++ {
		st, ok := lastStatus(c.Machine(i).Console(), i)
		if !ok || len(st.Snapshots) == 0 || st.Snapshots[0].Cluster == nil {
			t.Logf("node %d: no status with cluster counters", i)
			continue
		}
		cc := st.Snapshots[0].Cluster
		conv := cc.UpConverts + cc.DownConverts
		t.Logf("figures node %d (incarnation %d): %d writes acknowledged (%d to the origin), %d lock conversions (%.0f per 1000 writes, %.0f per 1000 origin writes), %d incremental refreshes, %d full reloads, %d invalid LVBs",
			i, w.links[i].gen, writes[i], originWrites[i], conv, 1000*float64(conv)/float64(max(writes[i], 1)), 1000*float64(conv)/float64(max(originWrites[i], 1)),
			cc.Refreshes, cc.Reloads, cc.InvalidLVBs)
		// Without the LVB counter a node would have to re-read the
		// metadata on every grant of CR or EX (every up-conversion); with
		// it, only when another node changed it.
		reads := cc.Refreshes + cc.Reloads
		t.Logf("figures node %d: metadata reads with the LVB counter %d (%d full), without it %d (one per grant): %.1fx fewer",
			i, reads, cc.Reloads, cc.UpConverts, float64(cc.UpConverts)/float64(max(reads, 1)))
	}
}
