package cluster

import (
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// recordedRun is a history and the image a device would hold after it:
// three writers on 64 blocks, flushes every few writes, some writes never
// acknowledged (in flight at a crash) of which some landed and some not.
func recordedRun(seed uint64) (*history, []byte, map[int64]value) {
	const blocks = 64
	rng := rand.New(rand.NewPCG(seed, 18))
	h := newHistory()
	img := make([]byte, blocks*blockSize)
	for b := range int64(blocks) {
		copy(img[b*blockSize:], encodeBlock(pristine, b))
	}
	lastFlushed := map[int64]value{}
	for node := uint8(1); node <= 3; node++ {
		var pending []*writeRec
		pendingBlocks := map[*writeRec]int64{}
		for seq := uint32(1); seq <= 200; seq++ {
			block := int64(rng.IntN(blocks/3))*3 + int64(node-1)
			v := value{kind: toOrigin, node: node, seq: seq}
			r := h.send(toOrigin, block, v)
			landed := rng.IntN(10) != 0
			if landed {
				copy(img[block*blockSize:], encodeBlock(v, block))
			}
			if landed && rng.IntN(5) != 0 {
				h.ack(r)
				pending = append(pending, r)
				pendingBlocks[r] = block
			}
			if len(pending) == 4 {
				h.flushed(pending)
				for _, p := range pending {
					lastFlushed[pendingBlocks[p]] = p.v
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
	rep := h.checkFinal(toOrigin, img)
	require.Empty(t, rep.problems)
	require.Equal(t, 64, rep.blocks)
	require.NotEmpty(t, lastFlushed)

	// A flushed write lost: its block reads as the write before it.
	var lost int64 = -1
	for block, v := range lastFlushed {
		recs := h.writes[blockKey{toOrigin, block}]
		for i, r := range recs {
			if r.v == v && i > 0 && recs[len(recs)-1].v == v {
				lost = block
				mutant := append([]byte(nil), img...)
				copy(mutant[block*blockSize:], encodeBlock(recs[i-1].v, block))
				assert.Len(t, h.checkFinal(toOrigin, mutant).problems, 1, "a lost flushed write of block %d", block)
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
		copy(mutant[block*blockSize:], encodeBlock(pristine, block))
		assert.Len(t, h.checkFinal(toOrigin, mutant).problems, 1, "block %d back to the original", block)
		break
	}

	// Bytes nobody wrote: one flipped bit, a write meant for another
	// block, a block torn between two writes.
	flipped := append([]byte(nil), img...)
	flipped[5*blockSize+1000] ^= 1
	assert.Len(t, h.checkFinal(toOrigin, flipped).problems, 1, "a flipped bit")
	moved := append([]byte(nil), img...)
	copy(moved[6*blockSize:], img[3*blockSize:4*blockSize])
	assert.Len(t, h.checkFinal(toOrigin, moved).problems, 1, "block 3's content in block 6")
	torn := append([]byte(nil), img...)
	copy(torn[7*blockSize+2048:(7*blockSize)+blockSize], encodeBlock(value{kind: toOrigin, node: 2, seq: 999}, 7)[2048:])
	assert.Len(t, h.checkFinal(toOrigin, torn).problems, 1, "a torn block")

	// A snapshot read sees only the original or writes sent to that block.
	assert.True(t, h.readable(toOrigin, 3, pristine))
	r := h.writes[blockKey{toOrigin, 3}]
	require.NotEmpty(t, r)
	assert.True(t, h.readable(toOrigin, 3, r[0].v))
	assert.False(t, h.readable(toOrigin, 6, r[0].v), "a write sent to another block")
	assert.False(t, h.readable(toSnapshot, 3, r[0].v), "a write sent to the other device")
	assert.False(t, h.readable(toOrigin, 3, value{kind: toOrigin, node: 1, seq: 10000}), "a write never sent")
}

// TestLastStatus: the figures come from the last complete status line.
func TestLastStatus(t *testing.T) {
	console := "[ 1.0] boot\n" +
		`{"cluster": {"node_id": 2}, "snapshots": [{"name": "snap", "cluster": {"up_conversions": 5}}]} ` + statusMarker(2, 1) + "\n" +
		`{"cluster": {"node_id": 2}, "snapshots": [{"name": "snap", "cluster": {"up_conversions": 9}}]} ` + statusMarker(2, 2) + "\n" +
		"[ 9.0] later\n"
	st, ok := lastStatus(console, 2)
	require.True(t, ok)
	require.Len(t, st.Snapshots, 1)
	assert.Equal(t, uint64(9), st.Snapshots[0].Cluster.UpConverts)
	_, ok = lastStatus(console, 1)
	assert.False(t, ok, "node 1 printed nothing")
}
