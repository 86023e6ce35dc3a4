package clusterload

import (
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// recordedRun is a history and the image a device would hold after it:
// three writers on 64 blocks, flushes every few writes, some writes never
// acknowledged (in flight at a crash) of which some landed and some not.
func recordedRun(seed uint64) (*History, []byte, map[int64]Value) {
	const blocks = 64
	rng := rand.New(rand.NewPCG(seed, 18))
	h := NewHistory()
	img := make([]byte, blocks*BlockSize)
	for b := range int64(blocks) {
		copy(img[b*BlockSize:], EncodeBlock(Pristine, b))
	}
	lastFlushed := map[int64]Value{}
	for node := uint8(1); node <= 3; node++ {
		var pending []*WriteRec
		pendingBlocks := map[*WriteRec]int64{}
		for seq := uint32(1); seq <= 200; seq++ {
			block := int64(rng.IntN(blocks/3))*3 + int64(node-1)
			v := Value{Kind: ToOrigin, Node: node, Seq: seq}
			r := h.Send(ToOrigin, block, v)
			landed := rng.IntN(10) != 0
			if landed {
				copy(img[block*BlockSize:], EncodeBlock(v, block))
			}
			if landed && rng.IntN(5) != 0 {
				h.Ack(r)
				pending = append(pending, r)
				pendingBlocks[r] = block
			}
			if len(pending) == 4 {
				h.Flushed(pending)
				for _, p := range pending {
					lastFlushed[pendingBlocks[p]] = p.V
				}
				pending = nil
			}
		}
	}
	return h, img, lastFlushed
}

// TestCheckerOnRecordedRun: the final check accepts a faithful device and
// rejects each kind of damage the cluster test exists to catch.
func TestCheckerOnRecordedRun(t *testing.T) {
	h, img, lastFlushed := recordedRun(1)
	rep := h.CheckFinal(ToOrigin, img)
	require.Empty(t, rep.Problems)
	require.Equal(t, 64, rep.Blocks)
	require.NotEmpty(t, lastFlushed)

	// A flushed write lost: its block reads as the write before it.
	var lost int64 = -1
	for block, v := range lastFlushed {
		recs := h.writes[blockKey{ToOrigin, block}]
		for i, r := range recs {
			if r.V == v && i > 0 && recs[len(recs)-1].V == v {
				lost = block
				mutant := append([]byte(nil), img...)
				copy(mutant[block*BlockSize:], EncodeBlock(recs[i-1].V, block))
				assert.Len(t, h.CheckFinal(ToOrigin, mutant).Problems, 1, "a lost flushed write of block %d", block)
			}
		}
		if lost >= 0 {
			break
		}
	}
	require.GreaterOrEqual(t, lost, int64(0), "the recorded run has a block whose last write was flushed")

	// A flushed block back to the original content.
	for block := range lastFlushed {
		mutant := append([]byte(nil), img...)
		copy(mutant[block*BlockSize:], EncodeBlock(Pristine, block))
		assert.Len(t, h.CheckFinal(ToOrigin, mutant).Problems, 1, "block %d back to the original", block)
		break
	}

	// Bytes nobody wrote: one flipped bit, a write meant for another
	// block, a block torn between two writes.
	flipped := append([]byte(nil), img...)
	flipped[5*BlockSize+1000] ^= 1
	assert.Len(t, h.CheckFinal(ToOrigin, flipped).Problems, 1, "a flipped bit")
	moved := append([]byte(nil), img...)
	copy(moved[6*BlockSize:], img[3*BlockSize:4*BlockSize])
	assert.Len(t, h.CheckFinal(ToOrigin, moved).Problems, 1, "block 3's content in block 6")
	torn := append([]byte(nil), img...)
	copy(torn[7*BlockSize+2048:(7*BlockSize)+BlockSize], EncodeBlock(Value{Kind: ToOrigin, Node: 2, Seq: 999}, 7)[2048:])
	assert.Len(t, h.CheckFinal(ToOrigin, torn).Problems, 1, "a torn block")

	// A snapshot read sees only the original or writes sent to that block.
	assert.True(t, h.Readable(ToOrigin, 3, Pristine))
	r := h.writes[blockKey{ToOrigin, 3}]
	require.NotEmpty(t, r)
	assert.True(t, h.Readable(ToOrigin, 3, r[0].V))
	assert.False(t, h.Readable(ToOrigin, 6, r[0].V), "a write sent to another block")
	assert.False(t, h.Readable(ToSnapshot, 3, r[0].V), "a write sent to the other device")
	assert.False(t, h.Readable(ToOrigin, 3, Value{Kind: ToOrigin, Node: 1, Seq: 10000}), "a write never sent")
}
