package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// An incremental backup with stock tools only, on a running server: a
// full copy of snapshot s1 (nbdcopy), then, after origin writes and a live
// snapshot s2, the ranges qemu:dirty-bitmap:s1 marks on s2 (nbdinfo --map)
// copied from s2 onto the full copy (qemu-img convert -n, one range at a
// time), which must then be s2 byte for byte. The same comparison with one
// dirty range left out must fail, so that it can catch a bitmap that
// misses a change. Deleting s1 live takes its bitmap away.
func TestIncrementalBackupWithDirtyBitmap(t *testing.T) {
	qemuIO := tool(t, "qemu-io", "qemu-utils")
	qemuImg := tool(t, "qemu-img", "qemu-utils")
	nbdcopy := tool(t, "nbdcopy", "libnbd-bin")
	nbdinfo := tool(t, "nbdinfo", "libnbd-bin")
	bin := buildSnapd(t)
	const size = 8 << 20
	f := newFixture(t, bin, size, 20)
	sock, ctl := filepath.Join(f.dir, "nbd.sock"), filepath.Join(f.dir, "control.sock")
	uri := func(name string) string { return "nbd+unix:///" + name + "?socket=" + sock }

	srv := startServe(t, bin, "--origin", f.origin, "--snapshot", "s1="+f.cow, "--listen", "", "--socket", sock, "--control", ctl)
	full := filepath.Join(f.dir, "full.img")
	run1(t, nbdcopy, uri("s1"), full)
	// Writes after the full backup: chunk-aligned and not, zeroes, and one
	// across a chunk boundary.
	run1(t, qemuIO, "-f", "raw", uri("origin"),
		"-c", "write -P 0x5a 64k 64k",
		"-c", "write -P 0x5b 1100k 512",
		"-c", "write -z 3M 8k",
		"-c", "write -P 0x5c 5116k 8k",
		"-c", "flush")
	run1(t, bin, "snapshot", "create", "--control", ctl, "--name", "s2", "--cow", filepath.Join(f.dir, "cow2.img"), "--cow-size", "4MiB")

	var listing struct {
		Exports []struct {
			Name     string   `json:"export-name"`
			Contexts []string `json:"contexts"`
		} `json:"exports"`
	}
	require.NoError(t, json.Unmarshal([]byte(run1(t, nbdinfo, "--list", "--json", uri(""))), &listing))
	require.Len(t, listing.Exports, 3)
	for _, e := range listing.Exports {
		want := []string{"base:allocation", "qemu:dirty-bitmap:s1", "qemu:dirty-bitmap:s2"}
		if e.Name != "origin" {
			want = append(want, "clustersnap:exceptions")
		}
		assert.ElementsMatch(t, want, e.Contexts, "contexts of %s", e.Name)
	}

	var extents []struct {
		Offset, Length int64
		Type           uint32
	}
	require.NoError(t, json.Unmarshal([]byte(run1(t, nbdinfo, "--map=qemu:dirty-bitmap:s1", "--json", uri("s2"))), &extents))
	var dirty [][2]int64
	for _, e := range extents {
		if e.Type&1 != 0 {
			dirty = append(dirty, [2]int64{e.Offset, e.Length})
		}
	}
	// The 4 KiB chunks the writes touched, no more.
	assert.Equal(t, [][2]int64{{64 << 10, 64 << 10}, {1100 << 10, 4 << 10}, {3 << 20, 8 << 10}, {5116 << 10, 8 << 10}}, dirty)

	// qemu reads the same map through x-dirty-bitmap, with the dirty bit
	// as its hole bit: the dirty ranges are the ones without data.
	var qemuMap []struct {
		Start, Length int64
		Data          bool
	}
	require.NoError(t, json.Unmarshal([]byte(run1(t, qemuImg, "map", "--output=json", "--image-opts",
		"driver=nbd,server.type=unix,server.path="+sock+",export=s2,x-dirty-bitmap=qemu:dirty-bitmap:s1")), &qemuMap))
	var qemuDirty [][2]int64
	for _, e := range qemuMap {
		if !e.Data {
			qemuDirty = append(qemuDirty, [2]int64{e.Start, e.Length})
		}
	}
	assert.Equal(t, dirty, qemuDirty)

	s2 := filepath.Join(f.dir, "s2.img")
	run1(t, nbdcopy, uri("s2"), s2)
	want, err := os.ReadFile(s2)
	require.NoError(t, err)
	incremental := func(ranges [][2]int64) []byte {
		t.Helper()
		img := filepath.Join(f.dir, fmt.Sprintf("incremental-%d.img", len(ranges)))
		data, err := os.ReadFile(full)
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(img, data, 0o600))
		for _, r := range ranges {
			window := fmt.Sprintf("driver=raw,offset=%d,size=%d,", r[0], r[1])
			run1(t, qemuImg, "convert", "-n",
				"--image-opts", window+"file.driver=nbd,file.server.type=unix,file.server.path="+sock+",file.export=s2",
				"--target-image-opts", window+"file.driver=file,file.filename="+img)
		}
		got, err := os.ReadFile(img)
		require.NoError(t, err)
		return got
	}
	fullData, err := os.ReadFile(full)
	require.NoError(t, err)
	require.False(t, bytes.Equal(fullData, want), "the origin writes changed s2 from s1")
	assert.True(t, bytes.Equal(want, incremental(dirty)), "the full copy plus the dirty ranges is s2")
	for i := range dirty {
		broken := slices.Delete(slices.Clone(dirty), i, i+1)
		assert.False(t, bytes.Equal(want, incremental(broken)), "a map without dirty range %v must fail the comparison", dirty[i])
	}

	run1(t, bin, "snapshot", "delete", "--control", ctl, "s1")
	require.NoError(t, json.Unmarshal([]byte(run1(t, nbdinfo, "--list", "--json", uri(""))), &listing))
	require.Len(t, listing.Exports, 2)
	for _, e := range listing.Exports {
		assert.NotContains(t, e.Contexts, "qemu:dirty-bitmap:s1", "contexts of %s", e.Name)
		assert.Contains(t, e.Contexts, "qemu:dirty-bitmap:s2", "contexts of %s", e.Name)
	}
	out, err := exec.Command(nbdinfo, "--map=qemu:dirty-bitmap:s1", uri("s2")).CombinedOutput()
	assert.Error(t, err, "%s", out)
	code, _ := srv.stop(t)
	assert.Equal(t, 0, code, "stderr: %s", srv.stderr)
}
