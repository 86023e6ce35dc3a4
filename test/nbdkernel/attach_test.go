package nbdkernel

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/test/guest"
)

const (
	// attachWriteOffset is where the guest writes through the device that
	// snapd attach made.
	attachWriteOffset = 20 << 20
	// attachWriteSize is how much it writes there.
	attachWriteSize = 1 << 20
	// attachCachedOffset is where the guest writes the first
	// attachCachedSize bytes of the same data again, without a sync, just
	// before it detaches: the write is in the guest's page cache only.
	attachCachedOffset = 40 << 20
	attachCachedSize   = 64 << 10
)

// snapdPackage is the command the guest runs.
const snapdPackage = "github.com/clustersnap/clustersnap/cmd/snapd"

// randomBytes returns n bytes from a PCG seeded with seed.
func randomBytes(seed uint64, n int) []byte {
	rng := rand.New(rand.NewPCG(seed, 7))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

// sha256Hex is the hex SHA-256 of b, as sha256sum prints it.
func sha256Hex(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// TestSnapdAttach runs snapd attach and snapd detach (package main's own
// NBD client: the handshake in userspace, then the socket handed to the
// kernel's nbd driver) in a guest against the test's server: it must fail
// with one clear line for an export the server does not have and for a
// device that does not exist, attach the read-write export with its size
// and its flags (flushes reach the server), read the served image, carry
// the guest's writes to it, and exit 0 once snapd detach has run; a
// read-only export must come up read-only, and SIGTERM must detach it.
func TestSnapdAttach(t *testing.T) {
	snapd := guest.BuildStatic(t, snapdPackage)
	written := randomBytes(21, attachWriteSize)
	r := guest.Setup(t, guest.Config{
		Modules:      []string{"virtio_pci", "virtio_net", "nbd"},
		Files:        map[string][]byte{"/bin/snapd": snapd, guestPayloadDir + "/written.bin": written},
		HostPrograms: []string{guest.Netcat},
	})

	srv := startServer(t, "scratch")
	original := randomBytes(20, imageSize)
	require.NoError(t, os.WriteFile(srv.image, original, 0o600))
	srv.marks.watch(attachWriteOffset, attachWriteSize)

	connect := fmt.Sprintf("--connect %s:%d", guest.GuestHostAddr, nbdPort)
	// attach starts snapd attach in the background with its output on a
	// fifo, and waits for the line it prints once the device is up.
	script := guestPrelude() + fmt.Sprintf(`
attach() {
	rm -f /tmp/attach.out; mkfifo /tmp/attach.out
	snapd attach %[1]s --export "$1" /dev/nbd0 >/tmp/attach.out 2>/tmp/attach.err &
	attach_pid=$!
	exec 3</tmp/attach.out
	read -r line <&3 || { echo "attach $1: $(cat /tmp/attach.err)"; exit 1; }
	result "attached-$1" "$line"
}
# ended waits for the background snapd attach and reports how it ended.
ended() {
	status=0
	wait $attach_pid || status=$?
	result "$1-status" "$status"
	result "$1-rest" "$(cat <&3)"
	result "$1-stderr" "$(cat /tmp/attach.err)"
	exec 3<&-
	result "size-after-$1" "$(cat /sys/block/nbd0/size)"
}
# fails runs snapd attach with arguments that must make it fail.
fails() {
	name=$1; shift
	status=0
	snapd attach "$@" >/tmp/out 2>/tmp/err || status=$?
	result "$name-status" "$status"
	result "$name-lines" "$(wc -l </tmp/err)"
	result "$name-error" "$(head -n 1 /tmp/err)"
	result "$name-stdout" "$(wc -c </tmp/out)"
}

fails missing-export %[1]s --export nosuch /dev/nbd0
fails missing-device %[1]s --export disk /dev/nbd99
fails not-nbd %[1]s --export disk /dev/null
result size-after-failures "$(cat /sys/block/nbd0/size)"

attach disk
result size "$(blockdev --getsize64 /dev/nbd0)"
result ro "$(blockdev --getro /dev/nbd0)"
result block-size "$(cat /sys/block/nbd0/queue/logical_block_size)"
result write-cache "$(cat /sys/block/nbd0/queue/write_cache)"
result read-sum "$(sha256sum /dev/nbd0 | cut -d' ' -f1)"
mark before-write
dd if=%[2]s/written.bin of=/dev/nbd0 bs=4096 seek=%[3]d conv=notrunc,fsync status=none
mark after-write
sync
echo 3 > /proc/sys/vm/drop_caches
result reread-sum "$(dd if=/dev/nbd0 bs=4096 skip=%[3]d count=%[4]d status=none | sha256sum | cut -d' ' -f1)"
dd if=%[2]s/written.bin of=/dev/nbd0 bs=4096 seek=%[5]d count=%[6]d conv=notrunc status=none
snapd detach /dev/nbd0 >/tmp/detach.out 2>&1 || { echo "detach: $(cat /tmp/detach.out)"; exit 1; }
result detach-output "$(cat /tmp/detach.out)"
ended detach

attach scratch
result scratch-ro "$(blockdev --getro /dev/nbd0)"
result scratch-sum "$(dd if=/dev/nbd0 bs=4096 skip=%[3]d count=%[4]d status=none | sha256sum | cut -d' ' -f1)"
mark before-scratch-write
if dd if=%[2]s/written.bin of=/dev/nbd0 bs=4096 count=1 conv=notrunc oflag=direct status=none 2>/dev/null; then
	result scratch-write allowed
else
	result scratch-write refused
fi
mark after-scratch-write
kill -TERM $attach_pid
ended term
dmesg | grep -i nbd | sed 's/^/dmesg /' || true
`, connect, guestPayloadDir, attachWriteOffset/4096, attachWriteSize/4096, attachCachedOffset/4096, attachCachedSize/4096)

	res := srv.boot(t, r, script, 1)
	srv.shutdown(t)
	results := parseResults(t, res.Output)

	// Failures: exit status 1, one line on stderr naming what is wrong,
	// nothing on stdout, and the device left unconfigured.
	for name, want := range map[string][]string{
		"missing-export": {"nosuch", "no such export"},
		"missing-device": {"/dev/nbd99", "no such device"},
		"not-nbd":        {"/dev/null", "not an nbd device"},
	} {
		assert.Equal(t, "1", results[name+"-status"], "%s: exit status", name)
		assert.Equal(t, "1", results[name+"-lines"], "%s: lines on stderr", name)
		assert.Equal(t, "0", results[name+"-stdout"], "%s: bytes on stdout", name)
		for _, w := range want {
			assert.Contains(t, results[name+"-error"], w, "%s: error", name)
		}
	}
	assert.Equal(t, "0", results["size-after-failures"], "size of /dev/nbd0 after the failed attaches")

	// The read-write export: its size, writable, 4 KiB blocks, a write
	// cache (the server's SEND_FLUSH reached the kernel), and the served
	// image's bytes.
	assert.Contains(t, results["attached-disk"], "/dev/nbd0")
	assert.Equal(t, strconv.Itoa(imageSize), results["size"], "size of /dev/nbd0")
	assert.Equal(t, "0", results["ro"], "read-only flag of /dev/nbd0 for export disk")
	assert.Equal(t, "4096", results["block-size"], "logical block size of /dev/nbd0")
	assert.Equal(t, "write back", results["write-cache"], "write cache of /dev/nbd0 (the server sends flushes)")
	assert.Equal(t, sha256Hex(original), results["read-sum"], "sha256 of /dev/nbd0 against the served image")

	// The write was on the server when dd conv=fsync returned, with a
	// flush; the guest reads it back from the server.
	before, after := srv.marks.get(t, "before-write"), srv.marks.get(t, "after-write")
	assert.True(t, bytes.Equal(original[attachWriteOffset:attachWriteOffset+attachWriteSize], before.region), "written region on the server before the write")
	assert.True(t, bytes.Equal(written, after.region), "written region on the server once dd conv=fsync returned")
	assert.Greater(t, after.flushes, before.flushes, "flushes for dd conv=fsync on /dev/nbd0")
	assert.Greater(t, after.writes, before.writes, "writes for dd on /dev/nbd0")
	assert.Equal(t, sha256Hex(written), results["reread-sum"], "sha256 of the written region read back after dropping caches")

	// snapd detach ended snapd attach with status 0 and released the
	// device, having written the cached write back first (checked in the
	// image below).
	assert.Equal(t, "/dev/nbd0 detached", results["detach-output"])
	assert.Equal(t, "0", results["detach-status"], "snapd attach's exit status after snapd detach")
	assert.Equal(t, "/dev/nbd0 detached", results["detach-rest"], "snapd attach's last output")
	assert.Empty(t, results["detach-stderr"], "snapd attach's stderr")
	assert.Equal(t, "0", results["size-after-detach"], "size of /dev/nbd0 after detach")

	// The read-only export came up read-only: the kernel refused the write
	// and the server never saw it; SIGTERM detached it with status 0.
	assert.Contains(t, results["attached-scratch"], "/dev/nbd0")
	assert.Equal(t, "1", results["scratch-ro"], "read-only flag of /dev/nbd0 for export scratch")
	assert.Equal(t, sha256Hex(written), results["scratch-sum"], "sha256 of the written region through export scratch")
	assert.Equal(t, "refused", results["scratch-write"], "a write to the read-only export")
	assert.Equal(t, "0", results["term-status"], "snapd attach's exit status after SIGTERM")
	assert.Equal(t, "/dev/nbd0 detached", results["term-rest"], "snapd attach's last output after SIGTERM")
	assert.Empty(t, results["term-stderr"], "snapd attach's stderr after SIGTERM")
	assert.Equal(t, "0", results["size-after-term"], "size of /dev/nbd0 after SIGTERM")
	assert.Empty(t, dmesgLines(res.Output, "timed out", "stuck request"), "requests timed out in the guest")

	// The server: one connection for the missing export, none for the
	// bad devices (checked before connecting), one per attach; the
	// guest's writes, the cached one too, are in the image and nothing
	// else changed.
	received := srv.listener.received()
	assert.Len(t, received, 3, "connections accepted")
	before, after = srv.marks.get(t, "before-scratch-write"), srv.marks.get(t, "after-scratch-write")
	require.Len(t, after.received, len(received))
	assert.Less(t, after.received[2]-before.received[2], int64(4096), "bytes the kernel sent to the read-only export for the refused write")
	assert.Equal(t, before.writes, srv.backend.counts().writes, "writes the server took from the guest's write to the read-only export on")
	got, err := os.ReadFile(srv.image)
	require.NoError(t, err)
	want := bytes.Clone(original)
	copy(want[attachWriteOffset:], written)
	copy(want[attachCachedOffset:], written[:attachCachedSize])
	assert.True(t, bytes.Equal(want, got), "served image: the original with the guest's writes at %d and %d", attachWriteOffset, attachCachedOffset)
	assert.True(t, bytes.Equal(written[:attachCachedSize], got[attachCachedOffset:attachCachedOffset+attachCachedSize]),
		"the guest's cached write at %d in the served image", attachCachedOffset)
}
