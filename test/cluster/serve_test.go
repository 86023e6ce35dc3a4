package cluster

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/persistent"
	"github.com/clustersnap/clustersnap/test/clusterload"
	"github.com/clustersnap/clustersnap/test/guest"
	"github.com/clustersnap/clustersnap/volumes"
)

const (
	nodes      = clusterload.Nodes
	originSize = 16 << 20
	cowSize    = 8 << 20
	chunkSize  = 4096
	// original is every origin byte before the test writes: what the
	// snapshot must read everywhere, whichever node serves it.
	original = 0x11
	// nbdPort is where snapd listens in each guest.
	nbdPort = 10809
)

// servingMarker is what guest i prints once its snapd serves and the
// kernel lockspace snapd joined has every node as a member.
func servingMarker(i int) string { return fmt.Sprintf("@@snapd-serving node=%d@@", i) }

// statusMarker ends the n-th line (from 1) in which guest i prints its
// snapd's status (snapd status --control --json on one line), every 3 s
// while snapd serves: once it is on the console, so is the whole line.
func statusMarker(i, n int) string { return fmt.Sprintf("%s%d@@", statusPrefix(i), n) }

// recoveriesPrefix starts the line guest i prints before each status
// line: how many recoveries of snapd's lockspace its kernel has completed
// (it logs one when a member joins or leaves), then "@@".
func recoveriesPrefix(i int) string { return fmt.Sprintf("@@dlm-recoveries node=%d count=", i) }

// statusPrefix starts the marker that ends every status line of guest i.
func statusPrefix(i int) string { return fmt.Sprintf("@@snapd-status node=%d n=", i) }

// fwdMAC is guest i's MAC on its host-forwarding network card.
func fwdMAC(i int) string { return fmt.Sprintf("52:54:00:00:02:%02x", i) }

// TestServeOnDLM: three guests serve one origin and its snapshot from
// shared disk images with snapd serve --lock dlm, coordinated by the
// kernel DLM across the guests. Through qemu-io on the host, each node
// writes the origin (also different sectors of one chunk from two nodes
// at once) while the snapshot must read as the original origin on every
// node; afterwards the COW passes the checker and its snapshot view, read
// on the host without any cluster, is the original origin.
func TestServeOnDLM(t *testing.T) {
	qemuIO, err := exec.LookPath("qemu-io")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("qemu-io not found: apt-get install qemu-utils")
		}
		t.Skip("qemu-io not found: apt-get install qemu-utils")
	}
	snapd := guest.BuildStatic(t, "github.com/clustersnap/clustersnap/cmd/snapd")
	r := guest.DLMSetup(t, guest.Config{Modules: []string{"virtio_blk"}, Files: map[string][]byte{"/bin/snapd": snapd}})

	dir := t.TempDir()
	origin, cow := filepath.Join(dir, "origin.img"), filepath.Join(dir, "cow.img")
	require.NoError(t, os.WriteFile(origin, bytes.Repeat([]byte{original}, originSize), 0o600))
	require.NoError(t, blockdev.Create(cow, cowSize))
	clusterload.FormatCOW(t, cow, chunkSize)

	ports := make([]int, nodes+1)
	for i := 1; i <= nodes; i++ {
		ports[i] = freePort(t)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 8*time.Minute)
	defer cancel()
	start := time.Now()
	c, err := guest.StartDLMCluster(ctx, r, guest.DLMClusterOptions{
		Nodes:     nodes,
		MemoryMiB: 768,
		QEMUArgs: func(i int) []string {
			return append(sharedDisks(origin, cow), forwardArgs(i, ports[i])...)
		},
		Script: serveScript,
	})
	require.NoError(t, err)
	defer c.Close()
	for i := 1; i <= nodes; i++ {
		if err := c.Machine(i).WaitConsole(ctx, servingMarker(i)); err != nil {
			t.Fatalf("node %d: %v\n%s", i, err, c.Machine(i).Console())
		}
	}
	t.Logf("three snapd nodes serving after %v", time.Since(start))
	uri := func(i int, export string) string { return fmt.Sprintf("nbd://127.0.0.1:%d/%s", ports[i], export) }
	io := func(i int, export string, cmds ...string) string {
		t.Helper()
		args := []string{"-f", "raw", uri(i, export)}
		for _, c := range cmds {
			args = append(args, "-c", c)
		}
		out, err := exec.CommandContext(ctx, qemuIO, args...).CombinedOutput()
		require.NoError(t, err, "node %d %s: qemu-io %q: %s", i, export, cmds, out)
		require.NotContains(t, string(out), "failed", "node %d %s: qemu-io %q", i, export, cmds)
		return string(out)
	}

	// A write through node 1 is seen on the origin through node 2 (no
	// page cache hides it) and not in the snapshot through node 3.
	io(1, volumes.OriginExport, "write -P 0xa1 40960 4096", "flush")
	io(2, volumes.OriginExport, "read -P 0xa1 40960 4096")
	io(3, "snap", "read -P 0x11 40960 4096")

	// Nodes 1 and 2 write different sectors of chunk 20 at the same time,
	// and every node writes chunks of its own and chunks the others also
	// write, concurrently: the snapshot must keep one copy of each
	// chunk's original data.
	var wg sync.WaitGroup
	for i := 1; i <= nodes; i++ {
		wg.Go(func() {
			cmds := []string{fmt.Sprintf("write -P 0x%02x %d 512", 0xb0+i, 20*chunkSize+(i-1)*512)}
			for k := range 24 {
				chunk := 100 + k*nodes + i // a chunk only node i writes
				cmds = append(cmds, fmt.Sprintf("write -P 0x%02x %d %d", 0xc0+i, chunk*chunkSize, chunkSize))
				shared := 300 + k // every node writes a sector of it
				cmds = append(cmds, fmt.Sprintf("write -P 0x%02x %d 512", 0xd0+i, shared*chunkSize+(i-1)*512))
			}
			cmds = append(cmds, "flush")
			io(i, volumes.OriginExport, cmds...)
		})
	}
	wg.Wait()
	for i := 1; i <= nodes; i++ {
		io(i, "snap", fmt.Sprintf("read -P 0x%02x 0 %d", original, originSize))
		io(i, volumes.OriginExport,
			fmt.Sprintf("read -P 0xb1 %d 512", 20*chunkSize),
			fmt.Sprintf("read -P 0xb2 %d 512", 20*chunkSize+512),
			fmt.Sprintf("read -P 0xb3 %d 512", 20*chunkSize+1024),
			fmt.Sprintf("read -P 0x11 %d %d", 20*chunkSize+1536, chunkSize-1536))
	}
	t.Logf("writes and checks done after %v", time.Since(start))
	c.Close()

	// The images as the kernel would find them after the cluster: a
	// clean COW whose snapshot is the original origin.
	dev, err := blockdev.Open(cow, blockdev.Options{})
	require.NoError(t, err)
	report, err := persistent.Check(context.Background(), dev, nil)
	require.NoError(t, err)
	require.NoError(t, dev.Close())
	assert.True(t, report.OK(), "snapd check: %+v", report)
	v, err := volumes.Open(context.Background(), volumes.Config{Origin: origin, Snapshots: []volumes.SnapshotSpec{{Name: "snap", COW: cow}}})
	require.NoError(t, err)
	defer v.Close()
	got := make([]byte, originSize)
	require.NoError(t, v.Snapshots()[0].ReadAt(context.Background(), got, 0))
	assert.True(t, bytes.Equal(bytes.Repeat([]byte{original}, originSize), got), "the snapshot is the original origin")
	require.NoError(t, v.Origin.ReadAt(context.Background(), got, 0))
	assert.Equal(t, bytes.Repeat([]byte{0xa1}, 4096), got[40960:40960+4096], "node 1's first write")
	for i := 1; i <= nodes; i++ {
		chunk := 100 + i
		assert.Equal(t, bytes.Repeat([]byte{byte(0xc0 + i)}, chunkSize), got[chunk*chunkSize:(chunk+1)*chunkSize], "node %d's chunk %d", i, chunk)
	}
}

// freePort returns a loopback TCP port nobody listens on now.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// sharedDisks are the origin (/dev/vda) and COW (/dev/vdb) images as disks
// every guest writes at once: no image lock, shared writers, no host
// cache.
func sharedDisks(paths ...string) []string {
	var args []string
	for k, p := range paths {
		id := fmt.Sprintf("shared%d", k)
		args = append(args,
			"-drive", fmt.Sprintf("file=%s,format=raw,if=none,id=%s,cache=none,file.locking=off", p, id),
			"-device", fmt.Sprintf("virtio-blk-pci,drive=%s,share-rw=on", id))
	}
	return args
}

// forwardArgs give guest i a network card on a restricted user-mode
// network that forwards the host's 127.0.0.1:port to the guest's snapd.
func forwardArgs(i, port int) []string {
	return []string{
		"-netdev", fmt.Sprintf("user,id=fwd,restrict=on,hostfwd=tcp:127.0.0.1:%d-:%d", port, nbdPort),
		"-device", fmt.Sprintf("virtio-net-pci,netdev=fwd,mac=%s,romfile=", fwdMAC(i)),
	}
}

// serveScript runs on guest i once it is a quorate DLM member: it brings
// up the forwarding card, starts snapd on the shared disks and reports
// when it serves, then stays up while snapd runs, printing its status
// every 3 s (see statusMarker, recoveriesPrefix). Neither the disks'
// arrival nor snapd's start is announced other than by their effects, so
// it polls them, each poll bounded.
func serveScript(i int) string { return serveScriptThen(i, "") }

// serveScriptThen is serveScript with then run once snapd serves and
// every node is a member of its lockspace, before the status loop.
func serveScriptThen(i int, then string) string { return serveScriptAround(i, "", then) }

// serveScriptAround is serveScriptThen with before run once the
// forwarding card is up and the shared disks are there, before snapd
// starts.
func serveScriptAround(i int, before, then string) string {
	return fmt.Sprintf(`ifc=
for d in /sys/class/net/*; do
	[ "$(cat $d/address)" = "%[2]s" ] && ifc=${d##*/}
done
[ -n "$ifc" ] || { echo "no card with MAC %[2]s"; exit 1; }
ip link set "$ifc" up
ip addr add 10.0.2.15/24 dev "$ifc"
t=0
until [ -b /dev/vda ] && [ -b /dev/vdb ]; do
	t=$((t + 1)); [ $t -le 300 ] || { echo "the shared disks did not appear"; exit 1; }
	sleep 0.1
done
%[7]s
snapd serve --origin /dev/vda --snapshot snap=/dev/vdb --cluster-id c1 --lock dlm --listen 0.0.0.0:%[3]d --control /run/snapd.ctl >/tmp/snapd.log 2>&1 &
pid=$!
t=0
until grep -q '^serving:' /tmp/snapd.log; do
	kill -0 $pid 2>/dev/null || { cat /tmp/snapd.log; echo "snapd exited"; exit 1; }
	t=$((t + 1)); [ $t -le 600 ] || { cat /tmp/snapd.log; echo "snapd does not serve"; exit 1; }
	sleep 0.2
done
t=0
until dlm_tool ls 2>/dev/null | grep -A 8 '^name *clustersnap' | grep -q 'members *1 2 3'; do
	kill -0 $pid 2>/dev/null || { cat /tmp/snapd.log; echo "snapd exited"; exit 1; }
	t=$((t + 1)); [ $t -le 600 ] || { dlm_tool ls; echo "the lockspace does not span the nodes"; exit 1; }
	sleep 0.2
done
echo "%[1]s"
%[5]s
n=0
while kill -0 $pid 2>/dev/null; do
	sleep 3
	s=$(snapd status --control /run/snapd.ctl --json 2>&1 | tr -d '\n\t')
	n=$((n + 1))
	r=$(dmesg | grep -c 'dlm: clustersnap: dlm_recover .* done')
	echo "%[6]s$r@@"
	echo "$s %[4]s$n@@"
done
wait $pid
echo "snapd exited with $?"
cat /tmp/snapd.log
`, servingMarker(i), fwdMAC(i), nbdPort, statusPrefix(i), then, recoveriesPrefix(i), before)
}
