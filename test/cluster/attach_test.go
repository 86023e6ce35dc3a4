package cluster

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/test/clusterload"
)

// triggerBlock is the origin block whose first write tells node 1 that
// the other nodes are writing the origin; the origin writers never write
// it.
const triggerBlock = clusterload.OriginBlocks - 1

// attachMarker is what node 1 prints when its kernel client is done, with
// the exit statuses of mkfs.ext4, e2fsck -fn and snapd attach.
const attachMarker = "@@attach-done@@"

// attachScript, run by node 1 once it serves, waits for the trigger
// block to change, attaches the node's own snapshot export with the
// kernel's nbd client (snapd attach), makes an ext4 file system on it,
// checks it, and detaches.
func attachScript() string {
	return fmt.Sprintf(`before=$(dd if=/dev/vda bs=4096 skip=%[1]d count=1 iflag=direct status=none | sha256sum)
t=0
until [ "$(dd if=/dev/vda bs=4096 skip=%[1]d count=1 iflag=direct status=none | sha256sum)" != "$before" ]; do
	t=$((t + 1)); [ $t -le 1200 ] || { echo "the trigger block never changed"; exit 1; }
	sleep 0.1
done
rm -f /tmp/attach.out; mkfifo /tmp/attach.out
snapd attach --connect 127.0.0.1:%[2]d --export snap /dev/nbd0 >/tmp/attach.out 2>/tmp/attach.err &
apid=$!
exec 3</tmp/attach.out
read -r line <&3 || { echo "attach: $(cat /tmp/attach.err)"; exit 1; }
echo "attached: $line"
mkfs=0; mkfs.ext4 -q -F /dev/nbd0 >/tmp/mkfs.out 2>&1 || mkfs=$?
cat /tmp/mkfs.out
fsck=0; e2fsck -fn /dev/nbd0 >/tmp/fsck.out 2>&1 || fsck=$?
cat /tmp/fsck.out
snapd detach /dev/nbd0 || echo "detach failed"
att=0; wait $apid || att=$?
exec 3<&-
echo "%[3]s mkfs=$mkfs e2fsck=$fsck attach=$att"`, triggerBlock, nbdPort, attachMarker)
}

// TestClusterAttach: node 1 attaches its own snapshot export with the
// kernel's nbd client (snapd attach) and runs mkfs.ext4 and e2fsck -fn on
// it while nodes 2 and 3 write the origin from the host: the block-device
// path on a cluster member. Both must exit 0 in the guest; the origin
// holds every flushed write; the COW passes the checker; and the
// snapshot view it holds is a clean ext4 to the host's e2fsck.
func TestClusterAttach(t *testing.T) {
	seed, _ := clusterload.Env(t, 0)
	e2fsck, err := exec.LookPath("e2fsck")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("e2fsck not found: apt-get install e2fsprogs")
		}
		t.Skip("e2fsck not found: apt-get install e2fsprogs")
	}
	r := clusterInitramfs(t)
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	tc := startTestCluster(ctx, t, r, seed, func(i int) string {
		if i == 1 {
			return serveScriptThen(i, attachScript())
		}
		return serveScript(i)
	})
	w := tc.w
	for i := 2; i <= nodes; i++ {
		w.Go(func() { w.Writer(ctx, i, clusterload.ToOrigin) })
	}
	defer w.Stop()
	require.NoError(t, w.WaitAcked(ctx, 2, 4))

	// The trigger, through node 2, recorded as an origin write like the
	// others.
	cl, err := clusterload.Dial(ctx, "tcp", tc.addrs[2], "origin")
	require.NoError(t, err)
	v := clusterload.Value{Kind: clusterload.ToOrigin, Node: 2, Seq: 1 << 31}
	rec := w.History().Send(clusterload.ToOrigin, triggerBlock, v)
	require.NoError(t, cl.Write(ctx, triggerBlock*clusterload.BlockSize, clusterload.EncodeBlock(v, triggerBlock)))
	w.History().Ack(rec)
	require.NoError(t, cl.Flush(ctx))
	w.History().Flushed([]*clusterload.WriteRec{rec})
	require.NoError(t, cl.Close())
	triggered := w.Counts().Acked
	began := time.Now()

	m := tc.c.Machine(1)
	if err := m.WaitConsole(ctx, attachMarker); err != nil {
		t.Fatalf("node 1: %v", err)
	}
	during := w.Counts().Acked
	w.Stop()
	out := consoleTail(m.Console(), 30)
	assert.Contains(t, out, attachMarker+" mkfs=0 e2fsck=0 attach=0", "node 1's kernel client:\n%s", out)
	t.Logf("node 1: mkfs.ext4 and e2fsck -fn through its kernel nbd client took %v; meanwhile nodes 2 and 3 acknowledged %d and %d origin writes",
		time.Since(began).Round(100*time.Millisecond), during[2]-triggered[2], during[3]-triggered[3])
	for i := 2; i <= nodes; i++ {
		assert.Greater(t, during[i], triggered[i], "node %d wrote the origin while node 1 made its file system", i)
	}
	require.Empty(t, w.Counts().Problems, "the workload saw these")
	tc.c.Close()

	finalOrigin, view, _ := clusterload.FinalImages(ctx, t, tc.origin, tc.cow)
	rep := w.History().CheckFinal(clusterload.ToOrigin, finalOrigin)
	t.Logf("origin: %d blocks checked, %d written, %d with a flushed write", rep.Blocks, rep.Written, rep.Flushed)
	assert.Empty(t, rep.Problems)
	img := filepath.Join(t.TempDir(), "snap.img")
	require.NoError(t, os.WriteFile(img, view, 0o600))
	fsck, err := exec.CommandContext(ctx, e2fsck, "-fn", img).CombinedOutput()
	assert.NoError(t, err, "the host's e2fsck -fn on the snapshot view:\n%s", fsck)
}
