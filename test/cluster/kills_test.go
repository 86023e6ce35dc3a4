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
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/test/clusterload"
	"github.com/clustersnap/clustersnap/test/guest"
	"github.com/clustersnap/clustersnap/volumes"
)

const (
	// phaseWrites is how many origin writes every serving node must have
	// acknowledged between two events (start, kill, rejoin).
	phaseWrites = 24
	// requestTimeout bounds one NBD request; a survivor's request waits
	// for the DLM's recovery from a node's death (about 25 s here).
	requestTimeout = 2 * time.Minute
)

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
	seed, kills := clusterload.Env(t, 2)
	t.Logf("seed %d (CLUSTERSNAP_SEED), %d kills (CLUSTERSNAP_SOAK_KILLS)", seed, kills)
	rng := rand.New(rand.NewPCG(seed, 0))
	r := clusterInitramfs(t)
	ctx, cancel := context.WithTimeout(t.Context(), time.Duration(6+3*kills)*time.Minute)
	defer cancel()
	tc := startTestCluster(ctx, t, r, seed, serveScript)
	c, w, start := tc.c, tc.w, tc.start
	origin, cow, dump := tc.origin, tc.cow, tc.dump

	for i := 1; i <= nodes; i++ {
		w.Go(func() { w.Writer(ctx, i, clusterload.ToOrigin) })
		w.Go(func() { w.Writer(ctx, i, clusterload.ToSnapshot) })
		w.Go(func() { w.Reader(ctx, i) })
	}
	defer w.Stop()
	fail := func(format string, args ...any) {
		w.Stop()
		// The reason first: CI may show only the start of a long log.
		t.Errorf("%s; workload problems: %q", fmt.Sprintf(format, args...), w.Counts().Problems)
		for i := 1; i <= nodes; i++ {
			t.Logf("node %d console tail:\n%s", i, consoleTail(c.Machine(i).Console(), 40))
		}
		t.FailNow()
	}
	waitAll := func(base [nodes + 1]int, more int, except int) {
		for i := 1; i <= nodes; i++ {
			if i == except {
				continue
			}
			if err := w.WaitAcked(ctx, i, base[i]+more); err != nil {
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
		w.Down(victim)
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
		base := w.Counts().Acked
		waitAll(base, phaseWrites, victim)
		t.Logf("kill %d: the survivors acknowledged %d more origin writes each %v after the kill", k, phaseWrites, time.Since(killed).Round(100*time.Millisecond))
		// The survivors go on writing while the victim boots, joins
		// corosync and its snapd joins the lockspace.
		rebooted := time.Now()
		if err := c.Reboot(ctx, victim); err != nil {
			fail("node %d's reboot: %v", victim, err)
		}
		if err := c.Machine(victim).WaitConsole(ctx, servingMarker(victim)); err != nil {
			fail("node %d after its reboot: %v", victim, err)
		}
		w.Serving(victim)
		base = w.Counts().Acked
		waitAll(base, phaseWrites, 0)
		t.Logf("kill %d: node %d rejoined and served %v after its boot began; every node acknowledged %d more origin writes", k, victim, time.Since(rebooted).Round(100*time.Millisecond), phaseWrites)
	}

	// The figures, from every node's snapd before it stops: a status line
	// printed after the workload ended.
	statusBefore := make([]int, nodes+1)
	for i := 1; i <= nodes; i++ {
		statusBefore[i] = statusCount(c.Machine(i).Console(), i)
	}
	w.Stop()
	for i := 1; i <= nodes; i++ {
		if err := waitStatus(ctx, c.Machine(i), i, statusBefore[i]+1); err != nil {
			t.Logf("node %d: no status after the workload: %v", i, err)
		}
	}
	logFigures(t, w, c)
	c.Close()
	counts := w.Counts()
	t.Logf("workload: %d origin writes acknowledged per node %v, %d failed on killed nodes %v, %d flushes completed; %d snapshot reads checked %d blocks",
		counts.Acked[1]+counts.Acked[2]+counts.Acked[3], counts.Acked[1:], counts.Failed[1]+counts.Failed[2]+counts.Failed[3], counts.Failed[1:], counts.Flushes, counts.Reads, counts.Checks)
	require.Empty(t, counts.Problems, "the workload saw these")
	t.Logf("workload and kills done after %v", time.Since(start).Round(time.Second))

	// The images, quiescent: the COW is clean, the origin holds every
	// flushed write, and the snapshot view every flushed snapshot write
	// over the original origin.
	finalOrigin, view, _ := clusterload.FinalImages(ctx, t, tc.origin, tc.cow)
	clusterload.CheckImages(t, w.History(), finalOrigin, view)

	// The kernel's dm-snapshot on the same images, in a fresh guest.
	res := guest.Boot(ctx, t, r, guest.Options{Script: fmt.Sprintf(`set -e
SZ=$(blockdev --getsz /dev/vda)
dmsetup create snap --table "0 $SZ snapshot /dev/vda /dev/vdb P %d"
dmsetup mknodes
st=$(dmsetup status snap); echo "result status $st"
dd if=/dev/mapper/snap of=/dev/vdc bs=1M iflag=direct oflag=direct status=none
dmsetup remove snap
`, clusterload.ChunkBytes/512), Disks: []guest.Disk{{Path: origin}, {Path: cow}, {Path: dump}}})
	status := guest.Results(res.Output)["status"]
	t.Logf("the kernel's dm-snapshot: %s", status)
	require.NotContains(t, status, "Invalid")
	kernelView, err := os.ReadFile(dump)
	require.NoError(t, err)
	if !bytes.Equal(view, kernelView) {
		var differ []int
		for b := range clusterload.OriginBlocks {
			if !bytes.Equal(view[b*clusterload.BlockSize:(b+1)*clusterload.BlockSize], kernelView[b*clusterload.BlockSize:(b+1)*clusterload.BlockSize]) {
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
	origin, cow, dump string   // images; dump receives the kernel's snapshot view
	addrs             []string // by node id, [0] unused
	c                 *guest.DLMCluster
	w                 *clusterload.Workload
	start             time.Time
}

// startTestCluster makes the images (an origin of original blocks, a
// COW with killChunkBytes chunks), boots the cluster with script and
// waits until every node serves. The workload is ready, not started.
func startTestCluster(ctx context.Context, t *testing.T, r *guest.Initramfs, seed uint64, script func(i int) string) *testCluster {
	t.Helper()
	dir := t.TempDir()
	tc := &testCluster{origin: filepath.Join(dir, "origin.img"), cow: filepath.Join(dir, "cow.img"), dump: filepath.Join(dir, "dump.img")}
	pristineOrigin := clusterload.PristineImage(clusterload.OriginBlocks)
	require.NoError(t, os.WriteFile(tc.origin, pristineOrigin, 0o600))
	require.NoError(t, os.WriteFile(tc.dump, make([]byte, len(pristineOrigin)), 0o600))
	require.NoError(t, blockdev.Create(tc.cow, clusterload.COWSize))
	clusterload.FormatCOW(t, tc.cow, clusterload.ChunkBytes)

	ports := make([]int, nodes+1)
	tc.addrs = make([]string, nodes+1)
	for i := 1; i <= nodes; i++ {
		ports[i] = freePort(t)
		tc.addrs[i] = fmt.Sprintf("127.0.0.1:%d", ports[i])
	}
	w := clusterload.NewWorkload(clusterload.Options{
		Seed: seed,
		Dial: func(ctx context.Context, i int, export string) (*clusterload.Client, error) {
			return clusterload.Dial(ctx, "tcp", tc.addrs[i], export)
		},
		RequestTimeout: requestTimeout,
	})
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
		w.Serving(i)
	}
	t.Logf("three snapd nodes serving after %v", time.Since(tc.start).Round(time.Second))
	return tc
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
	var kept []string
	for line := range strings.SplitSeq(strings.TrimRight(s, "\n"), "\n") {
		// The periodic status and recovery lines would fill the tail
		// (a status line is kilobytes of JSON); lastStatus reads them.
		if strings.Contains(line, "@@snapd-status ") || strings.Contains(line, "@@dlm-recoveries ") {
			continue
		}
		kept = append(kept, line)
	}
	return strings.Join(kept[max(0, len(kept)-n):], "\n")
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
func logFigures(t *testing.T, w *clusterload.Workload, c *guest.DLMCluster) {
	t.Helper()
	counts := w.Counts()
	writes, originWrites := counts.AckedGen, counts.OriginGen
	for i := 1; i <= nodes; i++ {
		st, ok := lastStatus(c.Machine(i).Console(), i)
		if !ok || len(st.Snapshots) == 0 || st.Snapshots[0].Cluster == nil {
			t.Logf("node %d: no status with cluster counters", i)
			continue
		}
		cc := st.Snapshots[0].Cluster
		conv := cc.UpConverts + cc.DownConverts
		t.Logf("figures node %d (incarnation %d): %d writes acknowledged (%d to the origin), %d lock conversions (%.0f per 1000 writes, %.0f per 1000 origin writes), %d incremental refreshes, %d full reloads, %d invalid LVBs",
			i, w.Incarnation(i), writes[i], originWrites[i], conv, 1000*float64(conv)/float64(max(writes[i], 1)), 1000*float64(conv)/float64(max(originWrites[i], 1)),
			cc.Refreshes, cc.Reloads, cc.InvalidLVBs)
		// Without the LVB counter a node would have to re-read the
		// metadata on every grant of CR or EX (every up-conversion); with
		// it, only when another node changed it.
		reads := cc.Refreshes + cc.Reloads
		t.Logf("figures node %d: metadata reads with the LVB counter %d (%d full), without it %d (one per grant): %.1fx fewer",
			i, reads, cc.Reloads, cc.UpConverts, float64(cc.UpConverts)/float64(max(reads, 1)))
	}
}
