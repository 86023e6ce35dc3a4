package main

import (
	"context"
	"encoding/json"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/internal/cutcheck"
	"github.com/clustersnap/clustersnap/test/clusterload"
	"github.com/clustersnap/clustersnap/volumes"
)

// TestLiveSnapshotEndToEnd creates a snapshot with 'snapd snapshot create'
// while NBD clients keep writing the origin, every acknowledged write
// logged: nbdinfo lists the new export at once, and nbdcopy's copy of it
// must be a cut of the writes (package cutcheck). Then it is listed,
// deleted (its export goes, its COW is marked invalid), and refusals get
// their exit codes.
func TestLiveSnapshotEndToEnd(t *testing.T) {
	nbdinfo := tool(t, "nbdinfo", "libnbd-bin")
	nbdcopy := tool(t, "nbdcopy", "libnbd-bin")
	bin := buildSnapd(t)
	const size, regionBytes, writers = 8 << 20, 12 << 10, 3
	dir := t.TempDir()
	origin, sock, ctl := filepath.Join(dir, "origin"), filepath.Join(dir, "nbd.sock"), filepath.Join(dir, "control.sock")
	require.NoError(t, os.WriteFile(origin, nil, 0o600))
	require.NoError(t, os.Truncate(origin, size))
	srv := startServe(t, bin, "--origin", origin, "--listen", "", "--socket", sock, "--control", ctl)
	uri := func(export string) string { return "nbd+unix:///" + export + "?socket=" + sock }

	h := cutcheck.New(regionBytes)
	ctx, stop := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	warm := make(chan struct{}, writers)
	var cutDone atomic.Bool
	enough := make(chan struct{}, writers) // a writer wrote 100 times after the cut
	for w := range writers {
		c, err := clusterload.Dial(ctx, "unix", sock, volumes.OriginExport)
		require.NoError(t, err)
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			rng := rand.New(rand.NewPCG(7, uint64(w)))
			buf := make([]byte, regionBytes)
			after := 0
			for n := 0; n < 100000; n++ {
				if n == 50 {
					warm <- struct{}{}
				}
				if ctx.Err() != nil && n > 50 {
					return
				}
				write := func(p []byte, off int64) error { return c.Write(context.Background(), uint64(off), p) }
				if err := h.Write(rng.IntN(size/regionBytes), buf, write); err != nil {
					t.Errorf("writer %d: %v", w, err)
					return
				}
				if cutDone.Load() {
					if after++; after == 100 {
						enough <- struct{}{}
					}
				}
			}
		}()
	}
	for range writers {
		<-warm
	}
	cow := filepath.Join(dir, "live.cow")
	h.CutBegins()
	out := run1(t, bin, "snapshot", "create", "--control", ctl, "--name", "live", "--cow", cow, "--cow-size", "16MiB")
	h.CutEnds()
	cutDone.Store(true)
	assert.Contains(t, out, `served as NBD export "live"`)
	// The writers go on a while, overwriting what the snapshot keeps.
	select {
	case <-enough:
	case <-time.After(time.Minute):
		t.Error("no writer wrote 100 times in a minute after the snapshot")
	}
	stop()
	wg.Wait()

	assert.Contains(t, run1(t, nbdinfo, "--list", uri("")), `export="live"`)
	img := filepath.Join(dir, "live.img")
	run1(t, nbdcopy, uri("live"), img)
	got, err := os.ReadFile(img)
	require.NoError(t, err)
	sent, acked := h.Writes()
	t.Logf("%d writes sent, %d acknowledged", sent, acked)
	assert.Empty(t, h.Check(got, 10), "the snapshot is not a cut of the logged writes")

	var snaps []volumes.SnapshotStatus
	require.NoError(t, json.Unmarshal([]byte(run1(t, bin, "snapshot", "list", "--control", ctl, "--json")), &snaps))
	require.Len(t, snaps, 1)
	assert.Equal(t, "live", snaps[0].Name)
	assert.Equal(t, "valid", snaps[0].State)
	assert.NotZero(t, snaps[0].Exceptions, "the writes after the cut were copied")
	assert.Contains(t, run1(t, bin, "snapshot", "list", "--control", ctl), "live")

	// status reports each export's clients and counters.
	var full volumes.Status
	require.NoError(t, json.Unmarshal([]byte(run1(t, bin, "status", "--control", ctl, "--json")), &full))
	exports := map[string]volumes.ExportStatus{}
	for _, e := range full.Exports {
		exports[e.Name] = e
	}
	require.Contains(t, exports, "live")
	assert.GreaterOrEqual(t, exports[volumes.OriginExport].Writes, uint64(acked))
	assert.Equal(t, uint64(acked)*regionBytes, exports[volumes.OriginExport].WrittenBytes)
	assert.Equal(t, uint64(writers), exports[volumes.OriginExport].ConnectionsTotal)
	assert.Positive(t, exports["live"].Reads, "nbdcopy read the snapshot")
	text := run1(t, bin, "status", "--control", ctl)
	assert.Contains(t, text, "EXPORT")
	assert.Contains(t, text, "live")

	for _, c := range []struct {
		args []string
		code int
		msg  string
	}{
		{[]string{"create", "--control", ctl, "--name", "live", "--cow", filepath.Join(dir, "b"), "--cow-size", "1MiB"}, exitError, "a snapshot of that name is served"},
		{[]string{"create", "--control", ctl, "--name", "a/b", "--cow", filepath.Join(dir, "c"), "--cow-size", "1MiB"}, exitUsage, "not allowed"},
		{[]string{"create", "--control", ctl, "--name", "x", "--cow", filepath.Join(dir, "d")}, exitError, "--cow-size"},
		{[]string{"create", "--control", ctl, "--name", "x"}, exitUsage, "required"},
		{[]string{"delete", "--control", ctl, "nope"}, exitError, "no such snapshot"},
		{[]string{"delete", "--control", filepath.Join(dir, "no.sock"), "live"}, exitError, "is 'snapd serve --control"},
		{[]string{"rename"}, exitUsage, "unknown subcommand"},
	} {
		cmd := exec.Command(bin, append([]string{"snapshot"}, c.args...)...)
		out, err := cmd.CombinedOutput()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		}
		assert.Equal(t, c.code, code, "snapd snapshot %v: %s", c.args, out)
		assert.Contains(t, string(out), c.msg, "snapd snapshot %v", c.args)
	}

	assert.Contains(t, run1(t, bin, "snapshot", "delete", "--control", ctl, "live"), "deleted snapshot live")
	assert.NotContains(t, run1(t, nbdinfo, "--list", uri("")), `export="live"`)
	assert.Contains(t, run1(t, bin, "snapshot", "list", "--control", ctl, "--json"), "[]")
	code, _ := srv.stop(t)
	assert.Equal(t, 0, code, "stderr: %s", srv.stderr)

	var st []statusReport
	require.NoError(t, json.Unmarshal([]byte(run1(t, bin, "status", "--json", cow)), &st))
	require.Len(t, st, 1)
	assert.Equal(t, "invalid", st[0].State)
}

// TestLiveSnapshotSurvivesARestart: with --catalog, a snapshot created
// live is served again by a restarted snapd that names only the catalog;
// without one, 'snapshot create' warns that it is not recorded.
func TestLiveSnapshotSurvivesARestart(t *testing.T) {
	nbdinfo := tool(t, "nbdinfo", "libnbd-bin")
	bin := buildSnapd(t)
	dir := t.TempDir()
	origin, sock, ctl, cat := filepath.Join(dir, "origin"), filepath.Join(dir, "nbd.sock"), filepath.Join(dir, "control.sock"), filepath.Join(dir, "catalog")
	require.NoError(t, os.WriteFile(origin, make([]byte, 1<<20), 0o600))
	args := []string{"--origin", origin, "--listen", "", "--socket", sock, "--control", ctl}

	srv := startServe(t, bin, args...)
	out, err := exec.Command(bin, "snapshot", "create", "--control", ctl, "--name", "unrecorded", "--cow", filepath.Join(dir, "u.cow"), "--cow-size", "1MiB").CombinedOutput()
	require.NoError(t, err, "%s", out)
	assert.Contains(t, string(out), "not recorded")
	code, _ := srv.stop(t)
	require.Equal(t, 0, code)

	srv = startServe(t, bin, append(args, "--catalog", cat)...)
	out, err = exec.Command(bin, "snapshot", "create", "--control", ctl, "--name", "kept", "--cow", filepath.Join(dir, "k.cow"), "--cow-size", "1MiB").CombinedOutput()
	require.NoError(t, err, "%s", out)
	assert.NotContains(t, string(out), "not recorded")
	assert.Contains(t, run1(t, bin, "status", "--control", ctl), "catalog "+cat)
	code, _ = srv.stop(t)
	require.Equal(t, 0, code)

	srv = startServe(t, bin, append(args, "--catalog", cat)...)
	list := run1(t, nbdinfo, "--list", "nbd+unix:///?socket="+sock)
	assert.Contains(t, list, `export="kept"`)
	assert.NotContains(t, list, `export="unrecorded"`)
	code, _ = srv.stop(t)
	require.Equal(t, 0, code)
}
