//go:build linux

package blockdev_test

import (
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore/blockdev"
)

// BenchmarkDurableWrite4K compares the two ways to make one 4 KiB write
// durable, WriteAt followed by Sync and WriteAtSync, on a temp file whose
// blocks are already allocated (so the figures are about the data, not about
// block allocation), buffered and with O_DIRECT.
func BenchmarkDurableWrite4K(b *testing.B) {
	const blockSize, fileSize = 4096, 16 << 20
	for _, direct := range []bool{false, true} {
		mode := "buffered"
		if direct {
			mode = "direct"
		}
		path := filepath.Join(b.TempDir(), "dev")
		require.NoError(b, blockdev.Create(path, fileSize))
		f, err := blockdev.Open(path, blockdev.Options{Direct: direct})
		if direct && err != nil {
			b.Logf("skipping O_DIRECT: %v", err)
			continue
		}
		require.NoError(b, err)
		fill := blockdev.AlignedBuffer(1<<20, max(f.Alignment(), blockSize))
		for off := int64(0); off < fileSize; off += int64(len(fill)) {
			_, err := f.WriteAt(fill, off)
			require.NoError(b, err)
		}
		require.NoError(b, f.Sync())
		buf := blockdev.AlignedBuffer(blockSize, max(f.Alignment(), blockSize))

		b.Run(mode+"/WriteAt+Sync", func(b *testing.B) {
			b.SetBytes(blockSize)
			off := int64(0)
			for b.Loop() {
				if _, err := f.WriteAt(buf, off); err != nil {
					b.Fatal(err)
				}
				if err := f.Sync(); err != nil {
					b.Fatal(err)
				}
				off = (off + blockSize) % fileSize
			}
		})
		b.Run(mode+"/WriteAtSync", func(b *testing.B) {
			b.SetBytes(blockSize)
			off := int64(0)
			for b.Loop() {
				if _, err := f.WriteAtSync(buf, off); err != nil {
					b.Fatal(err)
				}
				off = (off + blockSize) % fileSize
			}
		})
		require.NoError(b, f.Close())
	}
}
