package kernel

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/exstore/cow"
	"github.com/clustersnap/clustersnap/persistent"
	"github.com/clustersnap/clustersnap/test/guest"
	"github.com/clustersnap/clustersnap/volumes"
)

// mergeChunkSectors is the chunk size of the merge tests' COWs: 4 KiB, so
// that a few hundred writes fill more than one metadata area.
const mergeChunkSectors = 8

// mergeWaitScript defines wait_merged DEV for the merge guests: it polls the
// snapshot-merge device's status until the merge is done (sectors allocated
// == metadata sectors, i.e. only the header and area 0 are left), failing on
// a status without usage figures ("Merge failed", "Invalid") or after about
// two minutes. A guest has no event to wait on: the kernel reports merge
// progress only through the status.
const mergeWaitScript = `
wait_merged() {
	local dev=$1 i=0 st
	while :; do
		st=$(dmsetup status "$dev")
		set -- $st
		case "${4-}" in
		*/*) ;;
		*) echo "merge of $dev failed: status $st"; return 1 ;;
		esac
		if [ "${4%%/*}" = "${5-}" ]; then
			result "$dev-status" "$st"
			return 0
		fi
		i=$((i+1))
		if [ "$i" -ge 2400 ]; then
			echo "merge of $dev not done: status $st"
			return 1
		fi
		sleep 0.05
	done
}
`

// mergePair is an origin image with a COW image holding one snapshot of it,
// and what the snapshot must show.
type mergePair struct {
	origin, cow string // image paths
	view        []byte // the snapshot view the COW and origin make
}

// clone copies the pair's images to dir under a prefix.
func (p mergePair) clone(t *testing.T, dir, prefix string) mergePair {
	t.Helper()
	return mergePair{
		origin: writeImage(t, dir, prefix+"-origin.img", readImage(t, p.origin)),
		cow:    writeImage(t, dir, prefix+"-cow.img", readImage(t, p.cow)),
		view:   p.view,
	}
}

// TestDMSnapshotMerge checks our merge against the kernel's snapshot-merge
// target, both ways. Two COWs are made, each with more exceptions than one
// metadata area holds: one by the kernel (a guest writes through
// snapshot-origin and to the snapshot device) and one by our COW engine on
// host files. Each is copied twice; one copy is merged by the kernel in a
// guest (snapshot-merge), the other by cow.Origin.Merge on the host. All four
// merged origins must equal the snapshot view the COW held, byte for byte,
// and the two merges of one COW must leave the same COW image: every
// metadata area zeroed, the header and data chunks as they were, with usage
// allocated == metadata (2 chunks) as the kernel reports it. A third copy
// of each is merged as snapd merges a served origin (volumes.Set.Merge, the
// live merge, with no writes meanwhile): the same origin as the kernel's,
// and the same COW but for the label, which records the merge as done.
func TestDMSnapshotMerge(t *testing.T) {
	r := guest.Setup(t, guest.Config{
		Modules:  []string{"virtio_pci", "virtio_blk", "dm-snapshot"},
		Binaries: []string{"dmsetup"},
	})
	ctx, cancel := context.WithTimeout(t.Context(), 2*bootTimeout)
	defer cancel()
	dir := t.TempDir()

	kernelWritten := kernelWrittenCOW(ctx, t, r, dir)
	engineWritten := engineWrittenCOW(ctx, t, dir)

	kernelByKernel := kernelWritten.clone(t, dir, "kernel-cow-kernel-merge")
	kernelByUs := kernelWritten.clone(t, dir, "kernel-cow-our-merge")
	engineByKernel := engineWritten.clone(t, dir, "our-cow-kernel-merge")
	engineByUs := engineWritten.clone(t, dir, "our-cow-our-merge")
	kernelLive := kernelWritten.clone(t, dir, "kernel-cow-live-merge")
	engineLive := engineWritten.clone(t, dir, "our-cow-live-merge")

	// The kernel merges one copy of each COW, in one guest.
	script := guestPrelude + mergeWaitScript + fmt.Sprintf(`
merge() {
	dmsetup create "$1-real" --table "0 $SZ linear $2 0"
	dmsetup mknodes
	dmsetup create "$1" --table "0 $SZ snapshot-merge /dev/mapper/$1-real $3 P %d"
	st=$(dmsetup status "$1"); result "$1-status-start" "$st"
	wait_merged "$1"
	dmsetup remove "$1"
	dmsetup remove "$1-real"
	h=$(sha "$2"); result "$1-origin-sha256" "$h"
}
merge kernelcow /dev/vda /dev/vdb
merge ourcow /dev/vdc /dev/vdd
`, mergeChunkSectors)
	res := guest.Boot(ctx, t, r, guest.Options{Script: script, Disks: []guest.Disk{
		{Path: kernelByKernel.origin}, {Path: kernelByKernel.cow},
		{Path: engineByKernel.origin}, {Path: engineByKernel.cow},
	}})
	results := parseResults(t, res.Output)

	// Our merge of the other copies.
	kernelCOWUsage := mergeOnHost(ctx, t, kernelByUs)
	engineCOWUsage := mergeOnHost(ctx, t, engineByUs)
	mergeLiveOnHost(ctx, t, kernelLive)
	mergeLiveOnHost(ctx, t, engineLive)

	for _, c := range []struct {
		name           string
		byKernel, byUs mergePair
		live           mergePair
		kernelKey      string
		ourMergeUsage  exstore.Usage
		written        mergePair
	}{
		{name: "kernel's COW", byKernel: kernelByKernel, byUs: kernelByUs, live: kernelLive, kernelKey: "kernelcow", ourMergeUsage: kernelCOWUsage, written: kernelWritten},
		{name: "our COW", byKernel: engineByKernel, byUs: engineByUs, live: engineLive, kernelKey: "ourcow", ourMergeUsage: engineCOWUsage, written: engineWritten},
	} {
		kernelOrigin := readImage(t, c.byKernel.origin)
		ourOrigin := readImage(t, c.byUs.origin)
		assertSameImage(t, c.written.view, kernelOrigin, mergeChunkSectors, c.name+": origin merged by the kernel vs the snapshot view")
		assertSameImage(t, c.written.view, ourOrigin, mergeChunkSectors, c.name+": origin merged by us vs the snapshot view")
		assertSameImage(t, kernelOrigin, ourOrigin, mergeChunkSectors, c.name+": origin merged by us vs by the kernel")
		assert.Equal(t, sha256Hex(kernelOrigin), results[c.kernelKey+"-origin-sha256"], "%s: guest's hash of the merged origin", c.name)

		kernelStatus := mergedUsage(t, results[c.kernelKey+"-status"])
		assert.Equal(t, kernelStatus, c.ourMergeUsage.String(), "%s: usage after our merge vs the kernel's status after its merge", c.name)
		kernelCOW := readImage(t, c.byKernel.cow)
		ourCOW := readImage(t, c.byUs.cow)
		assertMergedCOW(ctx, t, c.byKernel.cow, kernelStatus, c.name+": COW merged by the kernel")
		assertMergedCOW(ctx, t, c.byUs.cow, kernelStatus, c.name+": COW merged by us")
		assertSameImage(t, kernelCOW, ourCOW, mergeChunkSectors, c.name+": COW merged by us vs by the kernel")
		// Merging clears records only: the data chunks are as they were.
		assertSameDataChunks(t, readImage(t, c.written.cow), ourCOW, c.name+": data chunks after our merge")

		// snapd's live merge: the same origin, and the same COW but for
		// its label, which says merged.
		assertSameImage(t, kernelOrigin, readImage(t, c.live.origin), mergeChunkSectors, c.name+": origin merged live by snapd vs by the kernel")
		assertMergedCOW(ctx, t, c.live.cow, kernelStatus, c.name+": COW merged live by snapd")
		liveCOW := readImage(t, c.live.cow)
		l, ok, err := persistent.DecodeLabel(liveCOW[persistent.LabelOffset:])
		require.NoError(t, err, c.name)
		require.True(t, ok, "%s: the live merge labels the COW", c.name)
		assert.Equal(t, exstore.Merged, l.Merge, "%s: the label records the merge as done", c.name)
		assert.Equal(t, int64(originSize), l.Origin.Size, "%s: the label names the origin", c.name)
		assert.Equal(t, make([]byte, persistent.LabelSize), kernelCOW[persistent.LabelOffset:persistent.LabelOffset+persistent.LabelSize], "%s: the kernel's COW has no label", c.name)
		clear(liveCOW[persistent.LabelOffset : persistent.LabelOffset+persistent.LabelSize])
		assertSameImage(t, kernelCOW, liveCOW, mergeChunkSectors, c.name+": COW merged live by snapd (label cleared) vs by the kernel")
	}
}

// mergeLiveOnHost merges the pair's snapshot into its origin as snapd
// does while it serves the origin (volumes.Open, Set.Merge: merge mode,
// recorded in the COW's label), with no writes meanwhile. The origin must
// read as the snapshot view from the merge's start, and the COW be
// refused by the next Open.
func mergeLiveOnHost(ctx context.Context, t *testing.T, p mergePair) {
	t.Helper()
	config := volumes.Config{Origin: p.origin, Snapshots: []volumes.SnapshotSpec{{Name: "snap", COW: p.cow}}}
	v, err := volumes.Open(ctx, config)
	require.NoError(t, err)
	s := v.Snapshots()[0]
	require.NoError(t, v.Origin.StartMerge(ctx, s))
	got := make([]byte, v.Origin.Size())
	require.NoError(t, v.Origin.ReadAt(ctx, got, 0))
	require.True(t, bytes.Equal(p.view, got), "the origin in merge mode reads as the snapshot")
	var reports []cow.MergeProgress
	require.NoError(t, v.Merge(ctx, s, func(p cow.MergeProgress) { reports = append(reports, p) }))
	require.NotEmpty(t, reports, "merge progress")
	last := reports[len(reports)-1]
	assert.Equal(t, last.Total, last.Done, "the last progress report counts every exception")
	require.NoError(t, v.Origin.ReadAt(ctx, got, 0))
	require.True(t, bytes.Equal(p.view, got), "the origin after the live merge")
	require.NoError(t, v.Close())
	_, err = volumes.Open(ctx, config)
	require.ErrorIs(t, err, volumes.ErrMergedCOW)
	t.Logf("live merge of %s: %d exceptions in %d runs", p.cow, last.Total, len(reports))
}

// kernelWrittenCOW has the kernel take a snapshot (P, 4 KiB chunks) of a
// random origin on a zeroed COW and write to the origin (through
// snapshot-origin) and to the snapshot, spanning more than one metadata
// area. The view it returns is the original with the snapshot writes, which
// must be what the kernel showed.
func kernelWrittenCOW(ctx context.Context, t *testing.T, r *guest.Initramfs, dir string) mergePair {
	t.Helper()
	rng := rand.New(rand.NewPCG(3, 8))
	original := randomBytes(rng, originSize)
	p := mergePair{
		origin: writeImage(t, dir, "kernel-origin.img", original),
		cow:    writeImage(t, dir, "kernel-cow.img", make([]byte, cowSize)),
	}
	plan := mergeWritePlan(rng)
	payloadPath := writeImage(t, dir, "kernel-payload.img", plan.payload())
	script := guestPrelude + fmt.Sprintf(`
dmsetup create base-real --table "0 $SZ linear /dev/vda 0"
dmsetup mknodes
dmsetup create snap --table "0 $SZ snapshot /dev/mapper/base-real /dev/vdb P %d"
dmsetup create base --table "0 $SZ snapshot-origin /dev/mapper/base-real"
dmsetup mknodes
[ -b /dev/mapper/base ] && [ -b /dev/mapper/snap ]
`, mergeChunkSectors) + plan.script("/dev/vdc", map[target]string{toOrigin: "/dev/mapper/base", toSnapshot: "/dev/mapper/snap"}) + `
st=$(dmsetup status snap); result status "$st"
h=$(sha /dev/mapper/snap); result snapshot-sha256 "$h"
dmsetup remove base
dmsetup remove snap
dmsetup remove base-real
`
	res := guest.Boot(ctx, t, r, guest.Options{Script: script, Disks: []guest.Disk{
		{Path: p.origin}, {Path: p.cow}, {Path: payloadPath, ReadOnly: true},
	}})
	results := parseResults(t, res.Output)

	p.view = bytes.Clone(original)
	plan.apply(toSnapshot, p.view)
	require.Equal(t, sha256Hex(p.view), results["snapshot-sha256"], "the kernel's snapshot must be the original with the snapshot writes")
	wantOrigin := bytes.Clone(original)
	plan.apply(toOrigin, wantOrigin)
	gotOrigin := readImage(t, p.origin)
	require.True(t, bytes.Equal(wantOrigin, gotOrigin), "the kernel's origin must be the original with the origin writes")
	require.False(t, bytes.Equal(gotOrigin, p.view), "a merge must have something to change")

	cowDev, err := blockdev.Open(p.cow, blockdev.Options{ReadOnly: true})
	require.NoError(t, err)
	defer cowDev.Close()
	store, err := persistent.Open(ctx, cowDev, persistent.Options{})
	require.NoError(t, err)
	defer store.Close()
	require.Equal(t, kernelUsage(t, results["status"]), store.Usage().String(), "usage: kernel status vs ours")
	require.Greater(t, store.Usage().Exceptions, store.Geometry().PerArea,
		"the kernel's exceptions must span more than one metadata area")
	return p
}

// engineWrittenCOW has our COW engine take a snapshot (a new persistent
// store, 4 KiB chunks) of a random origin on host files and write to the
// origin and to the snapshot as kernelWrittenCOW's guest does, spanning
// more than one metadata area.
func engineWrittenCOW(ctx context.Context, t *testing.T, dir string) mergePair {
	t.Helper()
	rng := rand.New(rand.NewPCG(4, 8))
	original := randomBytes(rng, originSize)
	p := mergePair{origin: writeImage(t, dir, "our-origin.img", original), cow: filepath.Join(dir, "our-cow.img")}
	require.NoError(t, blockdev.Create(p.cow, cowSize))
	plan := mergeWritePlan(rng)

	originDev, err := blockdev.Open(p.origin, blockdev.Options{})
	require.NoError(t, err)
	defer originDev.Close()
	cowDev, err := blockdev.Open(p.cow, blockdev.Options{})
	require.NoError(t, err)
	defer cowDev.Close()
	store, err := persistent.Open(ctx, cowDev, persistent.Options{ChunkSectors: mergeChunkSectors})
	require.NoError(t, err)
	defer store.Close()
	origin := cow.NewOrigin(originDev)
	snap, err := origin.AddSnapshot("snap", store, cowDev, cow.SnapshotOptions{})
	require.NoError(t, err)

	replayOnEngine(ctx, t, &plan, origin, snap)
	require.NoError(t, origin.Flush(ctx))
	require.NoError(t, snap.Flush(ctx))
	require.NoError(t, snap.Err())

	p.view = bytes.Clone(original)
	plan.apply(toSnapshot, p.view)
	wantOrigin := bytes.Clone(original)
	plan.apply(toOrigin, wantOrigin)
	gotView := make([]byte, snap.Size())
	require.NoError(t, snap.ReadAt(ctx, gotView, 0))
	require.True(t, bytes.Equal(p.view, gotView), "our snapshot must be the original with the snapshot writes")
	require.True(t, bytes.Equal(wantOrigin, readImage(t, p.origin)), "our origin must be the original with the origin writes")
	require.False(t, bytes.Equal(wantOrigin, p.view), "a merge must have something to change")
	require.Greater(t, store.Usage().Exceptions, store.Geometry().PerArea,
		"our exceptions must span more than one metadata area")
	require.NoError(t, store.Close())
	return p
}

// mergeWritePlan is the writes that make a COW to merge: random pages,
// sector runs and unaligned writes as in the other interop tests, and some
// 16-64 KiB page runs, so that the COW has runs of consecutive exceptions
// that a merge copies as one I/O. Origin writes outnumber snapshot writes;
// together they give more exceptions than one 4 KiB-chunk area holds (256).
func mergeWritePlan(rng *rand.Rand) writePlan {
	var plan writePlan
	plan.addRandom(rng, toOrigin, originSize, mix{aligned: 260, sectors: 30, unaligned: 6})
	plan.addRandom(rng, toSnapshot, originSize, mix{aligned: 40, sectors: 15, unaligned: 4})
	for i := range 8 {
		dev := toOrigin
		if i%4 == 3 {
			dev = toSnapshot
		}
		n := (4 + rng.Int64N(13)) * 4096
		off := rng.Int64N((originSize-n)/4096+1) * 4096
		plan.add(dev, off, randomBytes(rng, int(n)))
	}
	plan.shuffle(rng)
	return plan
}

// replayOnEngine makes plan's writes through our COW engine: origin writes
// through origin, snapshot writes through snap. Writes that share no chunk
// run concurrently in batches, as an NBD server's requests may, so that the
// store commits exceptions in batches; a write never runs beside an earlier
// write it shares a chunk with, so the result is the plan's, in order.
func replayOnEngine(ctx context.Context, t *testing.T, plan *writePlan, origin *cow.Origin, snap *cow.Snapshot) {
	t.Helper()
	chunkBytes := int64(snap.ChunkSectors()) * exstore.SectorSize
	const maxBatch = 32
	var (
		batch []guestWrite
		busy  = map[int64]bool{}
	)
	run := func() {
		errs := make([]error, len(batch))
		var wg sync.WaitGroup
		for i, w := range batch {
			wg.Go(func() {
				if w.dev == toOrigin {
					errs[i] = origin.WriteAt(ctx, w.data, w.off, false)
				} else {
					errs[i] = snap.WriteAt(ctx, w.data, w.off, false)
				}
			})
		}
		wg.Wait()
		for i, err := range errs {
			require.NoError(t, err, "%s write of %d bytes at %d", batch[i].dev, len(batch[i].data), batch[i].off)
		}
		batch = batch[:0]
		clear(busy)
	}
	for _, w := range plan.writes {
		first, last := w.off/chunkBytes, (w.off+int64(len(w.data))-1)/chunkBytes
		conflict := len(batch) == maxBatch
		for c := first; c <= last && !conflict; c++ {
			conflict = busy[c]
		}
		if conflict {
			run()
		}
		for c := first; c <= last; c++ {
			busy[c] = true
		}
		batch = append(batch, w)
	}
	run()
}

// mergeOnHost merges the pair's snapshot into its origin with our COW engine
// (cow.Origin.Merge on host files) and returns the store's usage after the
// merge. The progress reports must count up to every exception the store
// had.
func mergeOnHost(ctx context.Context, t *testing.T, p mergePair) exstore.Usage {
	t.Helper()
	originDev, err := blockdev.Open(p.origin, blockdev.Options{})
	require.NoError(t, err)
	defer originDev.Close()
	cowDev, err := blockdev.Open(p.cow, blockdev.Options{})
	require.NoError(t, err)
	defer cowDev.Close()
	store, err := persistent.Open(ctx, cowDev, persistent.Options{})
	require.NoError(t, err)
	defer store.Close()
	origin := cow.NewOrigin(originDev)
	snap, err := origin.AddSnapshot("snap", store, cowDev, cow.SnapshotOptions{})
	require.NoError(t, err)

	before := store.Usage().Exceptions
	var reports []cow.MergeProgress
	require.NoError(t, origin.Merge(ctx, snap, func(p cow.MergeProgress) { reports = append(reports, p) }))
	require.NotEmpty(t, reports, "merge progress")
	for i, r := range reports {
		assert.Equal(t, before, r.Total, "progress report %d: total", i)
		if i > 0 {
			assert.Greater(t, r.Done, reports[i-1].Done, "progress report %d: done must grow", i)
		}
	}
	assert.Equal(t, before, reports[len(reports)-1].Done, "the last progress report must count every exception")
	assert.Less(t, len(reports), int(before), "runs of consecutive exceptions must merge as one")
	t.Logf("our merge of %s: %d exceptions in %d runs", p.cow, before, len(reports))

	usage := store.Usage()
	assert.Zero(t, usage.Exceptions, "exceptions left after our merge")
	require.NoError(t, store.Close())
	return usage
}

// mergedUsage returns the usage part of a snapshot-merge device's dmsetup
// status, failing t unless the merge is done (allocated == metadata).
func mergedUsage(t *testing.T, status string) string {
	t.Helper()
	fields := strings.Fields(status)
	require.Len(t, fields, 5, "snapshot-merge status %q", status)
	require.Equal(t, "snapshot-merge", fields[2], "snapshot-merge status %q", status)
	allocated, _, _ := strings.Cut(fields[3], "/")
	require.Equal(t, fields[4], allocated, "a done merge leaves allocated == metadata: %q", status)
	return fields[3] + " " + fields[4]
}

// assertMergedCOW checks a COW after a complete merge: it opens valid, with
// no exceptions, only the header and area 0 counted as allocated (the
// kernel's status after its merge, wantUsage) and every metadata area on
// the device zero.
func assertMergedCOW(ctx context.Context, t *testing.T, path, wantUsage, what string) {
	t.Helper()
	cowDev, err := blockdev.Open(path, blockdev.Options{ReadOnly: true})
	require.NoError(t, err)
	defer cowDev.Close()
	store, err := persistent.Open(ctx, cowDev, persistent.Options{NoFormat: true})
	require.NoError(t, err, what)
	defer store.Close()
	require.NoError(t, store.Err(), what)
	geo := store.Geometry()
	assert.Equal(t, uint32(mergeChunkSectors), geo.ChunkSectors, "%s: chunk size", what)
	usage := store.Usage()
	assert.Zero(t, usage.Exceptions, "%s: exceptions", what)
	assert.Equal(t, 2*uint64(mergeChunkSectors), usage.MetadataSectors, "%s: metadata sectors", what)
	assert.Equal(t, usage.MetadataSectors, usage.AllocatedSectors, "%s: allocated sectors", what)
	assert.Equal(t, wantUsage, usage.String(), "%s: usage vs the kernel's status after its merge", what)

	img := readImage(t, path)
	zero := make([]byte, geo.ChunkBytes)
	var nonzero []uint64
	for area := uint64(0); uint64(geo.AreaLocation(area)) < geo.Chunks; area++ {
		at := int64(geo.AreaLocation(area)) * geo.ChunkBytes
		if !bytes.Equal(zero, img[at:at+geo.ChunkBytes]) {
			nonzero = append(nonzero, area)
		}
	}
	assert.Empty(t, nonzero, "%s: metadata areas that are not zero", what)
}

// assertSameDataChunks checks that two COW images of 4 KiB chunks hold the
// same header and data chunks: everything but the metadata areas.
func assertSameDataChunks(t *testing.T, want, got []byte, what string) {
	t.Helper()
	geo := persistent.NewGeometry(mergeChunkSectors, int64(len(want)))
	require.Len(t, got, len(want), what)
	var differ []uint64
	for c := uint64(0); c < geo.Chunks; c++ {
		if c != 0 && geo.IsMetadata(exstore.Chunk(c)) {
			continue
		}
		lo, hi := int64(c)*geo.ChunkBytes, int64(c+1)*geo.ChunkBytes
		if !bytes.Equal(want[lo:hi], got[lo:hi]) {
			differ = append(differ, c)
		}
	}
	assert.Empty(t, differ, "%s: chunks that differ", what)
}
