package persistent_test

import (
	"context"
	"encoding/binary"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev/faultdev"
	"github.com/clustersnap/clustersnap/persistent"
)

// FuzzOpen feeds corrupted headers and areas to the loader: it must return
// an error or a store whose state is consistent, never panic or hang.
// The input is the first part of a 64 KiB device image with chunk size 1
// (E = 32), so areas are small and many of them fit.
func FuzzOpen(f *testing.F) {
	hdr := make([]byte, 512)
	persistent.Header{Magic: persistent.Magic, Valid: 1, Version: 1, ChunkSectors: 1}.Encode(hdr)
	f.Add(hdr)
	full := make([]byte, 2*512)
	copy(full, hdr)
	for i := 0; i < 32; i++ {
		persistent.EncodeRecord(full[512:], i, exstore.Exception{Old: exstore.Chunk(i * 3), New: exstore.Chunk(2 + i)})
	}
	f.Add(full)
	garbage := append([]byte(nil), full...)
	binary.LittleEndian.PutUint64(garbage[512+5*16+8:], 0) // terminator mid-area, records after it
	f.Add(garbage)
	labelled := append([]byte(nil), full...)
	if err := persistent.EncodeLabel(labelled[persistent.LabelOffset:], exstore.Label{UUID: exstore.UUID{1}, ClusterID: "c1"}); err != nil {
		f.Fatal(err)
	}
	f.Add(labelled) // the loader ignores a label, sound or not
	f.Add([]byte("SnAp\x01\x00\x00\x00\x02\x00\x00\x00\x08\x00\x00\x00"))
	f.Add([]byte{})

	f.Fuzz(func(t *testing.T, data []byte) {
		const size = 64 << 10
		if len(data) > size {
			data = data[:size]
		}
		img := make([]byte, size)
		copy(img, data)
		// Most mutations of a header make the magic wrong, which stops the
		// loader at once. When the first byte is odd, the fuzzer's bytes go
		// to the metadata areas behind a valid header with chunk size 1 or 2,
		// so the area parser gets the fuzzing.
		if len(data) > 0 && data[0]&1 == 1 {
			cs := uint32(1 + data[0]>>7)
			persistent.Header{Magic: persistent.Magic, Valid: 1, Version: 1, ChunkSectors: cs}.Encode(img)
		}
		if binary.LittleEndian.Uint32(img) == 0 {
			return // a new store: formatting is not the loader
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s, err := persistent.Open(ctx, faultdev.FromBytes("fuzz", img), persistent.Options{Logger: quietLogger()})
		if err != nil {
			require.NotErrorIs(t, err, context.DeadlineExceeded, "loader took too long")
			return
		}
		defer s.Close()
		u := s.Usage()
		g := s.Geometry()
		assert.LessOrEqual(t, u.MetadataSectors, u.AllocatedSectors+uint64(g.ChunkSectors))
		n := uint64(0)
		s.Walk(func(e exstore.Exception) bool {
			n++
			assert.Less(t, uint64(e.New), g.Chunks)
			assert.False(t, g.IsMetadata(e.New))
			assert.Less(t, uint64(e.New), u.AllocatedSectors/uint64(g.ChunkSectors), "next_free is past every loaded chunk")
			return true
		})
		assert.Equal(t, u.Exceptions, n)
		// A loaded store keeps working: a refresh changes nothing.
		if s.Err() == nil {
			require.NoError(t, s.Refresh(ctx))
			assert.Equal(t, u, s.Usage())
		}
	})
}
