package etcdcluster

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/lockc/etcd/etcdtest"
	"github.com/clustersnap/clustersnap/test/clusterload"
)

const (
	nodes = clusterload.Nodes
	// leaseTTL is the nodes' etcd lease: the survivors wait about this
	// long for a killed node's locks. 2 s is the shortest the embedded
	// etcd grants (its default election timeout of 1 s, times 3/2,
	// rounded up).
	leaseTTL = 2 * time.Second
	// phaseWrites is how many origin writes every serving node must have
	// acknowledged between two events (start, kill, restart).
	phaseWrites = 24
	// requestTimeout bounds one NBD request; a survivor's request may
	// wait for a killed node's lease to expire.
	requestTimeout = 30 * time.Second
	// defaultKills is how many kills a run has without
	// CLUSTERSNAP_SOAK_KILLS.
	defaultKills = 3
	// killsPerScale is how many kills share one scale of the workload's
	// layout, so that a soak's writers still race for fresh chunks at its
	// last kill (the test logs the fresh chunks left).
	killsPerScale = 8
)

// TestEtcdClusterKills: three snapd serve --lock etcd processes serve one
// origin file and its snapshot's COW file, coordinated by an etcd server
// in the test process, while the test writes the origin through every
// node (nodes racing to copy the same chunks), writes disjoint ranges of
// the snapshot and reads the snapshot on every node, checking every block
// it reads (package test/clusterload). A node is killed with SIGKILL
// mid-workload; the survivors must go on once its lease expires; it is
// started again, and must serve and go on; then another node is killed
// (3 kills, or CLUSTERSNAP_SOAK_KILLS). Afterwards, with every node
// stopped by SIGTERM (exit 0, its snapshot valid): snapd check is clean on
// the COW, and on the origin file and on the snapshot view the COW holds,
// every block holds its last flushed write (the original if none) or a
// write sent after it, and nothing nobody wrote. It logs a tally: kills,
// writes checked, violations.
func TestEtcdClusterKills(t *testing.T) {
	seed, kills := clusterload.Env(t, defaultKills)
	t.Logf("seed %d (CLUSTERSNAP_SEED), %d kills (CLUSTERSNAP_SOAK_KILLS)", seed, kills)
	rng := rand.New(rand.NewPCG(seed, 0))
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute+time.Duration(kills)*30*time.Second)
	defer cancel()
	start := time.Now()

	dir := t.TempDir()
	origin, cow := filepath.Join(dir, "origin.img"), filepath.Join(dir, "cow.img")
	// A soak gets a larger origin, so that its writers find fresh chunks
	// (which take the cluster's locks) through all its kills.
	ns := make([]*node, nodes+1)
	w := clusterload.NewWorkload(clusterload.Options{
		Seed: seed,
		Dial: func(ctx context.Context, i int, export string) (*clusterload.Client, error) {
			return clusterload.Dial(ctx, "unix", ns[i].sock, export)
		},
		RequestTimeout: requestTimeout,
		Scale:          (kills + killsPerScale - 1) / killsPerScale,
	})
	defer w.Stop()
	require.NoError(t, os.WriteFile(origin, clusterload.PristineImage(w.OriginBlocks()), 0o600))
	require.NoError(t, blockdev.Create(cow, w.COWSize()))
	clusterload.FormatCOW(t, cow, clusterload.ChunkBytes)
	requireDirect(t, cow)
	etcd := etcdtest.Start(t, 1)
	endpoint := etcd.Endpoint(0)

	logFile := nodesLog(t, dir)
	for i := 1; i <= nodes; i++ {
		sock, ctl := filepath.Join(dir, fmt.Sprintf("node-%d.nbd", i)), filepath.Join(dir, fmt.Sprintf("node-%d.ctl", i))
		ns[i] = &node{id: i, snapd: snapdBinary, sock: sock, ctl: ctl, log: logFile, args: []string{"serve",
			"--origin", origin, "--snapshot", clusterload.SnapshotExport + "=" + cow,
			"--cluster-id", "c1", "--lock", "etcd", "--etcd-endpoints", endpoint, "--etcd-lease-ttl", leaseTTL.String(),
			"--listen", "", "--socket", sock, "--control", ctl, "--stats-interval", "0"}}
	}
	defer func() {
		for i := 1; i <= nodes; i++ {
			if n := ns[i]; n.cmd != nil {
				select {
				case <-n.exited:
				default:
					n.kill()
				}
			}
		}
	}()
	// All three start at once: they race to stamp the COW's label and to
	// join the snapshot set.
	for i := 1; i <= nodes; i++ {
		require.NoError(t, ns[i].start())
	}
	fail := func(format string, args ...any) {
		t.Helper()
		w.Stop()
		for i := 1; i <= nodes; i++ {
			t.Logf("node %d (incarnation %d) output tail:\n%s", i, w.Incarnation(i), ns[i].tail(40))
		}
		t.Fatalf("%s; workload problems: %q", fmt.Sprintf(format, args...), w.Counts().Problems)
	}
	for i := 1; i <= nodes; i++ {
		if err := ns[i].waitServing(ctx); err != nil {
			fail("%v", err)
		}
		w.Serving(i)
	}
	t.Logf("three snapd processes serving after %v", time.Since(start).Round(10*time.Millisecond))

	for i := 1; i <= nodes; i++ {
		w.Go(func() { w.Writer(ctx, i, clusterload.ToOrigin) })
		w.Go(func() { w.Writer(ctx, i, clusterload.ToSnapshot) })
		w.Go(func() { w.Reader(ctx, i) })
	}
	waitAll := func(base [nodes + 1]int, except int) {
		t.Helper()
		for i := 1; i <= nodes; i++ {
			if i == except {
				continue
			}
			if err := w.WaitAcked(ctx, i, base[i]+phaseWrites); err != nil {
				fail("%v", err)
			}
		}
	}
	waitAll([nodes + 1]int{}, 0)
	victim := 0
	var survived, rejoined time.Duration
	for k := 1; k <= kills; k++ {
		victim = (victim+rng.IntN(nodes-1))%nodes + 1 // never the previous victim
		w.Down(victim)
		killed := time.Now()
		ns[victim].kill()
		base := w.Counts().Acked
		waitAll(base, victim)
		survived = max(survived, time.Since(killed))
		if testing.Verbose() && kills <= 10 {
			t.Logf("kill %d: node %d killed; the survivors acknowledged %d more origin writes each %v later", k, victim, phaseWrites, time.Since(killed).Round(10*time.Millisecond))
		}
		restarted := time.Now()
		if err := ns[victim].start(); err != nil {
			fail("%v", err)
		}
		if err := ns[victim].waitServing(ctx); err != nil {
			fail("kill %d: %v", k, err)
		}
		w.Serving(victim)
		base = w.Counts().Acked
		waitAll(base, 0)
		rejoined = max(rejoined, time.Since(restarted))
		if testing.Verbose() && kills <= 10 {
			t.Logf("kill %d: node %d restarted and served; every node acknowledged %d more origin writes %v after the restart", k, victim, phaseWrites, time.Since(restarted).Round(10*time.Millisecond))
		}
	}
	if kills > 0 {
		t.Logf("slowest: survivors' %d origin writes each after a kill %v; %d more by every node after a restart %v", phaseWrites, survived.Round(10*time.Millisecond), phaseWrites, rejoined.Round(10*time.Millisecond))
	}

	w.Stop()
	for i := 1; i <= nodes; i++ {
		logFigures(ctx, t, w, ns[i])
	}
	counts := w.Counts()
	t.Logf("workload: %d origin writes acknowledged per node %v, %d failed on killed nodes %v, %d flushes completed; %d snapshot reads checked %d blocks",
		counts.Acked[1]+counts.Acked[2]+counts.Acked[3], counts.Acked[1:], counts.Failed[1]+counts.Failed[2]+counts.Failed[3], counts.Failed[1:], counts.Flushes, counts.Reads, counts.Checks)
	left, all := w.FreshChunks()
	t.Logf("fresh origin chunks left at the end: %d of %d (scale %d)", left, all, (kills+killsPerScale-1)/killsPerScale)
	violations := len(counts.Problems)
	assert.Empty(t, counts.Problems, "the workload saw these")

	// Every node stops cleanly, its snapshot valid.
	for i := 1; i <= nodes; i++ {
		sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		err := ns[i].stop(sctx)
		cancel()
		out := ns[i].output()
		assert.NoError(t, err, "node %d's exit:\n%s", i, ns[i].tail(20))
		assert.Contains(t, out, "stopped", "node %d", i)
		if !assert.Regexp(t, `snapshot `+clusterload.SnapshotExport+`: .*, valid`, out, "node %d's snapshot at exit", i) {
			violations++
		}
	}

	// The files, quiescent: snapd check and persistent.Check are clean,
	// the origin holds every flushed write, and the snapshot view every
	// flushed snapshot write over the original origin.
	check, err := exec.CommandContext(ctx, snapdBinary, "check", cow).CombinedOutput()
	if !assert.NoError(t, err, "snapd check %s:\n%s", cow, check) {
		violations++
	}
	finalOrigin, view, clean := clusterload.FinalImages(ctx, t, origin, cow)
	if !clean {
		violations++
	}
	violations += clusterload.CheckImages(t, w.History(), finalOrigin, view)
	t.Logf("tally: %d kills, %d writes checked (%d acknowledged), %d snapshot blocks read and checked, %d violations; %v in all",
		kills, w.History().Sent(), w.History().Acked(), counts.Checks, violations, time.Since(start).Round(time.Second))
	assert.Zero(t, violations)
}

// nodesLog is the file that receives every node's output: nodes.log in
// CLUSTERSNAP_CONSOLE_DIR if set (kept after the test, appended to), in
// dir otherwise.
func nodesLog(t *testing.T, dir string) *os.File {
	t.Helper()
	if d := os.Getenv("CLUSTERSNAP_CONSOLE_DIR"); d != "" {
		dir = d
	}
	f, err := os.OpenFile(filepath.Join(dir, "nodes.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	require.NoError(t, err)
	t.Cleanup(func() { f.Close() })
	fmt.Fprintf(f, "\n==== %s at %s\n", t.Name(), time.Now().Format(time.TimeOnly))
	return f
}

// requireDirect fails the test unless path's file system takes O_DIRECT,
// which snapd needs with a shared lock engine (tmpfs, for one, refuses
// it): TMPDIR must be on one that does.
func requireDirect(t *testing.T, path string) {
	t.Helper()
	d, err := blockdev.Open(path, blockdev.Options{Direct: true, ReadOnly: true})
	if err != nil {
		t.Fatalf("%s: O_DIRECT: %v; set TMPDIR to a directory on a file system that takes it (ext4, xfs)", path, err)
	}
	require.NoError(t, d.Close())
}

// logFigures logs node n's lock conversions per 1000 writes its current
// incarnation acknowledged, from its status.
func logFigures(ctx context.Context, t *testing.T, w *clusterload.Workload, n *node) {
	t.Helper()
	st, err := n.status(ctx)
	if err != nil {
		t.Logf("figures node %d: %v", n.id, err)
		return
	}
	if st.Cluster == nil || len(st.Snapshots) == 0 || st.Snapshots[0].Cluster == nil {
		t.Logf("figures node %d: no cluster counters in its status", n.id)
		return
	}
	counts := w.Counts()
	cc := st.Snapshots[0].Cluster
	conv := cc.UpConverts + cc.DownConverts
	t.Logf("figures node %d (etcd node id %d, incarnation %d): %d writes acknowledged (%d to the origin), %d lock conversions (%.0f per 1000 origin writes), %d incremental refreshes, %d full reloads, %d invalid LVBs",
		n.id, st.Cluster.NodeID, w.Incarnation(n.id), counts.AckedGen[n.id], counts.OriginGen[n.id], conv, 1000*float64(conv)/float64(max(counts.OriginGen[n.id], 1)),
		cc.Refreshes, cc.Reloads, cc.InvalidLVBs)
}
