package kernel

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/persistent"
	"github.com/clustersnap/clustersnap/test/guest"
)

// Sizes of the images; the origin is also the snapshot's size.
const (
	originSize = 16 << 20
	cowSize    = 12 << 20
)

// bootTimeout bounds one guest boot, with its writes, under TCG.
const bootTimeout = 4 * time.Minute

// guestPrelude starts every guest script: stop at the first failure, helpers
// for results and whole-device hashes, and the origin size in sectors.
const guestPrelude = `set -eu
set -o pipefail
result() { echo "result $*"; }
sha() { dd if="$1" bs=1M iflag=direct status=none | sha256sum | cut -d' ' -f1; }
SZ=$(blockdev --getsz /dev/vda)
`

// TestDMSnapshotInterop boots the kernel in QEMU guests, one at a time, and
// checks the COW format both ways. The subtests share one initramfs.
func TestDMSnapshotInterop(t *testing.T) {
	r := guest.Setup(t, guest.Config{
		Modules:  []string{"virtio_pci", "virtio_blk", "dm-snapshot"},
		Binaries: []string{"dmsetup"},
	})
	t.Run("KernelWritesWeRead", func(t *testing.T) { kernelWritesWeRead(t, r) })
	t.Run("WeWriteKernelReads/chunk8", func(t *testing.T) { weWriteKernelReads(t, r, 8) })
	t.Run("WeWriteKernelReads/chunk16", func(t *testing.T) { weWriteKernelReads(t, r, 16) })
}

// kernelWritesWeRead has the kernel take a snapshot (P, 4 KiB chunks) on a
// zeroed COW and write to both the origin and the snapshot, then opens the
// COW with package persistent: its snapshot view must be the kernel's, and
// its usage figures the kernel's status.
func kernelWritesWeRead(t *testing.T, r *guest.Initramfs) {
	const chunkSectors = 8
	rng := rand.New(rand.NewPCG(1, 8))
	dir := t.TempDir()
	original := randomBytes(rng, originSize)
	originPath := writeImage(t, dir, "origin.img", original)
	cowPath := writeImage(t, dir, "cow.img", make([]byte, cowSize))
	dumpPath := writeImage(t, dir, "dump.img", make([]byte, originSize))

	var plan writePlan
	plan.addRandom(rng, toOrigin, originSize, mix{aligned: 300, sectors: 40, unaligned: 8})
	plan.addRandom(rng, toSnapshot, originSize, mix{aligned: 40, sectors: 20, unaligned: 5})
	plan.shuffle(rng)
	payloadPath := writeImage(t, dir, "payload.img", plan.payload())

	script := guestPrelude + fmt.Sprintf(`
dmsetup create base-real --table "0 $SZ linear /dev/vda 0"
dmsetup mknodes
dmsetup create snap --table "0 $SZ snapshot /dev/mapper/base-real /dev/vdb P %d"
dmsetup create base --table "0 $SZ snapshot-origin /dev/mapper/base-real"
dmsetup mknodes
[ -b /dev/mapper/base ] && [ -b /dev/mapper/snap ]
`, chunkSectors) + plan.script("/dev/vdc", map[target]string{toOrigin: "/dev/mapper/base", toSnapshot: "/dev/mapper/snap"}) + `
st=$(dmsetup status snap); result status "$st"
h=$(sha /dev/mapper/snap); result snapshot-sha256 "$h"
h=$(sha /dev/mapper/base); result origin-sha256 "$h"
dd if=/dev/mapper/snap of=/dev/vdd bs=1M iflag=direct oflag=direct status=none
dmsetup remove base
dmsetup remove snap
dmsetup remove base-real
`
	ctx, cancel := context.WithTimeout(t.Context(), bootTimeout)
	defer cancel()
	res := guest.Boot(ctx, t, r, guest.Options{Script: script, Disks: []guest.Disk{
		{Path: originPath}, {Path: cowPath}, {Path: payloadPath, ReadOnly: true}, {Path: dumpPath},
	}})
	results := parseResults(t, res.Output)

	// The origin holds exactly the origin writes, and the guest saw that too.
	wantOrigin := bytes.Clone(original)
	plan.apply(toOrigin, wantOrigin)
	gotOrigin := readImage(t, originPath)
	assertSameImage(t, wantOrigin, gotOrigin, chunkSectors, "origin image")
	assert.Equal(t, sha256Hex(gotOrigin), results["origin-sha256"], "guest's origin hash")

	cow, err := blockdev.Open(cowPath, blockdev.Options{ReadOnly: true})
	require.NoError(t, err)
	defer cow.Close()
	store, err := persistent.Open(ctx, cow, persistent.Options{})
	require.NoError(t, err)
	defer store.Close()
	require.NoError(t, store.Err())
	assert.Equal(t, uint32(chunkSectors), store.ChunkSectors())
	usage := store.Usage()
	require.Greater(t, usage.Exceptions, uint64(chunkSectors*exstore.SectorSize/16),
		"the kernel's exceptions must span more than one metadata area")
	assert.Equal(t, kernelUsage(t, results["status"]), usage.String(), "usage: kernel status vs ours")
	_, labelled, err := store.Label(ctx)
	require.NoError(t, err, "a COW the kernel formatted has a zeroed label area")
	assert.False(t, labelled)

	// Our view of the snapshot is the original with the snapshot writes, and
	// it is what the kernel showed.
	wantView := bytes.Clone(original)
	plan.apply(toSnapshot, wantView)
	view := snapshotView(ctx, t, store, cow, gotOrigin)
	assertSameImage(t, wantView, view, chunkSectors, "snapshot view read by persistent")
	assert.Equal(t, sha256Hex(view), results["snapshot-sha256"], "guest's snapshot hash")
	assertSameImage(t, view, readImage(t, dumpPath), chunkSectors, "snapshot view read by the kernel")
}

// weWriteKernelReads builds a labelled COW with package persistent (origin
// COWs and snapshot writes, a full metadata area and most of a second) and
// has the kernel activate it with "P 0": the kernel must use our chunk size,
// show our snapshot view and report our usage. The kernel then goes on writing through
// a snapshot-origin and to the snapshot, filling our last area and starting
// the next, and the COW it leaves must open here again with the kernel's view
// and usage, and still carry our label.
func weWriteKernelReads(t *testing.T, r *guest.Initramfs, chunkSectors uint32) {
	ctx, cancel := context.WithTimeout(t.Context(), bootTimeout)
	defer cancel()
	rng := rand.New(rand.NewPCG(2, uint64(chunkSectors)))
	dir := t.TempDir()
	chunkBytes := int64(chunkSectors) * exstore.SectorSize
	perArea := int(chunkBytes / 16)
	exceptions := 2*perArea - 40 // leaves the kernel 40 records of room in area 1

	original := randomBytes(rng, originSize)
	origin := bytes.Clone(original) // the origin as our COW engine leaves it
	view := bytes.Clone(original)   // the snapshot view we expect
	cowPath := filepath.Join(dir, "cow.img")
	require.NoError(t, blockdev.Create(cowPath, cowSize))

	cow, err := blockdev.Open(cowPath, blockdev.Options{})
	require.NoError(t, err)
	store, err := persistent.Open(ctx, cow, persistent.Options{ChunkSectors: chunkSectors})
	require.NoError(t, err)
	// The label the kernel must ignore and keep.
	label := exstore.Label{
		UUID:      exstore.UUID{0x6b, 0x65, 0x72, 0x6e, 0x65, 0x6c, 0x40, 0x01, 0x80, 2, 3, 4, 5, 6, 7, 8},
		ClusterID: "kernel-interop",
		Origin:    exstore.OriginIdentity{Size: originSize, ID: "serial=KERNEL-INTEROP"},
	}
	require.NoError(t, store.SetLabel(ctx, label))
	chunkOf := func(img []byte, c exstore.Chunk) []byte {
		return img[int64(c)*chunkBytes : int64(c+1)*chunkBytes]
	}

	// Exceptions in batches committed concurrently, as the COW engine does:
	// most for origin writes (old data to the COW, then the origin is
	// overwritten), the rest for snapshot writes (new data to the COW).
	olds := rng.Perm(originSize / int(chunkBytes))[:exceptions]
	const batch = 32
	for start := 0; start < len(olds); start += batch {
		var (
			prepared []exstore.Exception
			newData  [][]byte // per exception: the origin's new data, or nil for a snapshot write
		)
		for _, o := range olds[start:min(start+batch, len(olds))] {
			e, err := store.Prepare(ctx, exstore.Chunk(o))
			require.NoError(t, err)
			data := randomBytes(rng, int(chunkBytes))
			if rng.IntN(5) == 0 { // snapshot write: the view gets the data
				copy(chunkOf(view, e.Old), data)
				_, err = cow.WriteAt(data, int64(e.New)*chunkBytes)
				data = nil
			} else { // origin write: the COW gets the old data first
				_, err = cow.WriteAt(chunkOf(origin, e.Old), int64(e.New)*chunkBytes)
			}
			require.NoError(t, err)
			prepared = append(prepared, e)
			newData = append(newData, data)
		}
		commitAll(ctx, t, store, prepared)
		for i, e := range prepared {
			if newData[i] != nil {
				copy(chunkOf(origin, e.Old), newData[i])
			}
		}
	}
	// Writes to chunks that have an exception already: origin writes need no
	// COW; snapshot writes go to the COW chunk.
	for _, o := range olds[:40] {
		old := exstore.Chunk(o)
		data := randomBytes(rng, int(chunkBytes))
		if rng.IntN(2) == 0 {
			copy(chunkOf(origin, old), data)
			continue
		}
		newChunk, found, release, err := store.Lookup(ctx, old)
		require.NoError(t, err)
		require.True(t, found, "chunk %d was given an exception", old)
		_, err = cow.WriteAt(data, int64(newChunk)*chunkBytes)
		release()
		require.NoError(t, err)
		copy(chunkOf(view, old), data)
	}
	require.NoError(t, cow.Sync())
	ourUsage := store.Usage()
	require.Equal(t, uint64(exceptions), ourUsage.Exceptions)
	require.NoError(t, store.Close())
	require.NoError(t, cow.Close())

	// The kernel's turn: check our COW, then add to it.
	originPath := writeImage(t, dir, "origin.img", origin)
	dumpPath := writeImage(t, dir, "dump.img", make([]byte, originSize))
	var plan writePlan
	plan.addRandom(rng, toOrigin, originSize, mix{aligned: 150, sectors: 20, unaligned: 3})
	plan.addRandom(rng, toSnapshot, originSize, mix{aligned: 20, sectors: 10, unaligned: 2})
	plan.shuffle(rng)
	payloadPath := writeImage(t, dir, "payload.img", plan.payload())
	script := guestPrelude + `
dmsetup create base-real --table "0 $SZ linear /dev/vda 0"
dmsetup mknodes
dmsetup create snap --table "0 $SZ snapshot /dev/mapper/base-real /dev/vdb P 0"
dmsetup mknodes
[ -b /dev/mapper/snap ]
tb=$(dmsetup table snap); result table "$tb"
st=$(dmsetup status snap); result status "$st"
h=$(sha /dev/mapper/snap); result snapshot-sha256 "$h"
dd if=/dev/mapper/snap of=/dev/vdd bs=1M iflag=direct oflag=direct status=none
dmsetup create base --table "0 $SZ snapshot-origin /dev/mapper/base-real"
dmsetup mknodes
[ -b /dev/mapper/base ]
` + plan.script("/dev/vdc", map[target]string{toOrigin: "/dev/mapper/base", toSnapshot: "/dev/mapper/snap"}) + `
st=$(dmsetup status snap); result status-after "$st"
h=$(sha /dev/mapper/snap); result snapshot-sha256-after "$h"
h=$(sha /dev/mapper/base); result origin-sha256-after "$h"
dmsetup remove base
dmsetup remove snap
dmsetup remove base-real
`
	res := guest.Boot(ctx, t, r, guest.Options{Script: script, Disks: []guest.Disk{
		{Path: originPath}, {Path: cowPath}, {Path: payloadPath, ReadOnly: true}, {Path: dumpPath},
	}})
	results := parseResults(t, res.Output)

	// The kernel read our COW as we wrote it.
	table := strings.Fields(results["table"])
	require.GreaterOrEqual(t, len(table), 2, "dmsetup table: %q", results["table"])
	assert.Equal(t, []string{"P", strconv.Itoa(int(chunkSectors))}, table[len(table)-2:],
		"the kernel must take the chunk size from our header")
	assert.Equal(t, ourUsage.String(), kernelUsage(t, results["status"]), "usage: ours vs kernel status")
	assert.Equal(t, sha256Hex(view), results["snapshot-sha256"], "guest's snapshot hash")
	assertSameImage(t, view, readImage(t, dumpPath), chunkSectors, "snapshot view read by the kernel")

	// The kernel's additions open here: origin writes left the view alone,
	// snapshot writes changed it.
	wantOrigin := bytes.Clone(origin)
	plan.apply(toOrigin, wantOrigin)
	gotOrigin := readImage(t, originPath)
	assertSameImage(t, wantOrigin, gotOrigin, chunkSectors, "origin image after the kernel's writes")
	assert.Equal(t, sha256Hex(gotOrigin), results["origin-sha256-after"], "guest's origin hash")
	wantView := bytes.Clone(view)
	plan.apply(toSnapshot, wantView)

	cowRO, err := blockdev.Open(cowPath, blockdev.Options{ReadOnly: true})
	require.NoError(t, err)
	defer cowRO.Close()
	reopened, err := persistent.Open(ctx, cowRO, persistent.Options{})
	require.NoError(t, err)
	defer reopened.Close()
	require.NoError(t, reopened.Err())
	gotLabel, labelled, err := reopened.Label(ctx)
	require.NoError(t, err)
	require.True(t, labelled, "the kernel left our label in the header chunk")
	assert.Equal(t, label, gotLabel)
	usage := reopened.Usage()
	assert.Greater(t, usage.MetadataSectors, ourUsage.MetadataSectors,
		"the kernel must have filled our last metadata area and moved to the next")
	assert.Equal(t, kernelUsage(t, results["status-after"]), usage.String(), "usage: kernel status vs ours after the kernel's writes")
	gotView := snapshotView(ctx, t, reopened, cowRO, gotOrigin)
	assertSameImage(t, wantView, gotView, chunkSectors, "snapshot view after the kernel's writes")
	assert.Equal(t, sha256Hex(gotView), results["snapshot-sha256-after"], "guest's snapshot hash after its writes")
}

// commitAll commits prepared exceptions concurrently, so that the store
// batches them.
func commitAll(ctx context.Context, t *testing.T, store exstore.Store, prepared []exstore.Exception) {
	t.Helper()
	errs := make([]error, len(prepared))
	var wg sync.WaitGroup
	for i, e := range prepared {
		wg.Go(func() { errs[i] = store.Commit(ctx, e) })
	}
	wg.Wait()
	for i, err := range errs {
		require.NoError(t, err, "commit %v", prepared[i])
	}
}

// snapshotView reads the snapshot as the kernel would: a chunk with an
// exception from the COW, any other from the origin.
func snapshotView(ctx context.Context, t *testing.T, store exstore.Store, cow blockdev.Device, origin []byte) []byte {
	t.Helper()
	chunkBytes := int64(store.ChunkSectors()) * exstore.SectorSize
	view := bytes.Clone(origin)
	for c := int64(0); c*chunkBytes < int64(len(view)); c++ {
		newChunk, found, release, err := store.Lookup(ctx, exstore.Chunk(c))
		if err == nil && found {
			_, err = cow.ReadAt(view[c*chunkBytes:min((c+1)*chunkBytes, int64(len(view)))], int64(newChunk)*chunkBytes)
		}
		release()
		require.NoError(t, err, "chunk %d", c)
	}
	return view
}

// parseResults collects the guest's "result KEY VALUE" lines and logs them.
func parseResults(t *testing.T, output string) map[string]string {
	t.Helper()
	results := guest.Results(output)
	t.Logf("guest results: %v", results)
	return results
}

// kernelUsage returns the usage part ("<allocated>/<total> <metadata>") of a
// snapshot's dmsetup status line, failing t if it has none (e.g. "Invalid").
func kernelUsage(t *testing.T, status string) string {
	t.Helper()
	fields := strings.Fields(status)
	require.Len(t, fields, 5, "snapshot status %q", status)
	require.Equal(t, "snapshot", fields[2], "snapshot status %q", status)
	return fields[3] + " " + fields[4]
}

// assertSameImage checks two images are equal, naming the first chunks that
// differ.
func assertSameImage(t *testing.T, want, got []byte, chunkSectors uint32, what string) {
	t.Helper()
	if !assert.Equal(t, len(want), len(got), "%s: size", what) || bytes.Equal(want, got) {
		return
	}
	chunkBytes := int(chunkSectors) * exstore.SectorSize
	var differ []int
	for c := 0; c*chunkBytes < len(want); c++ {
		lo, hi := c*chunkBytes, min((c+1)*chunkBytes, len(want))
		if !bytes.Equal(want[lo:hi], got[lo:hi]) {
			differ = append(differ, c)
		}
	}
	t.Errorf("%s: %d chunks of %d bytes differ, the first: %v", what, len(differ), chunkBytes, differ[:min(len(differ), 20)])
}

// writeImage writes a disk image into dir and returns its path.
func writeImage(t *testing.T, dir, name string, data []byte) string {
	t.Helper()
	path := filepath.Join(dir, name)
	require.NoError(t, os.WriteFile(path, data, 0o600))
	return path
}

// readImage reads a whole disk image.
func readImage(t *testing.T, path string) []byte {
	t.Helper()
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	return data
}

func sha256Hex(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}
