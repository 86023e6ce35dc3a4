package dlm

import (
	"testing"

	"github.com/stretchr/testify/assert"

	"github.com/clustersnap/clustersnap/lockc"
)

// kernelLVBOps is the kernel's dlm_lvb_operations table (fs/dlm/lock.c)
// without its UN and PD rows and columns: 1 read, 0 write, -1 nothing, by
// granted mode (row) and requested mode (column), NL..EX.
var kernelLVBOps = [6][6]int{
	{1, 1, 1, 1, 1, 1},    // NL
	{-1, 1, 1, 1, 1, 1},   // CR
	{-1, -1, 1, 1, 1, 1},  // CW
	{-1, -1, -1, 1, 1, 1}, // PR: PR→CW moves nothing
	{0, 0, 0, 0, 0, 1},    // PW
	{0, 0, 0, 0, 0, 0},    // EX
}

// lockc's idea of what a conversion moves, which the engine uses, is the
// kernel's table.
func TestLVBOpIsKernelTable(t *testing.T) {
	want := map[int]lockc.LVBMove{1: lockc.LVBRead, 0: lockc.LVBWrite, -1: lockc.LVBStays}
	for gr := lockc.NL; gr <= lockc.EX; gr++ {
		for rq := lockc.NL; rq <= lockc.EX; rq++ {
			assert.Equal(t, want[kernelLVBOps[gr][rq]], lockc.LVBMoveOf(gr, rq), "%v→%v", gr, rq)
		}
	}
}

// What a conversion or unlock sends: zeros on reads; on writes from PW or
// EX the staged value (or the copy) with IVVALBLK if an invalidation is
// staged; otherwise the copy.
func TestOutgoing(t *testing.T) {
	read, staged := lockc.LVB{1}, lockc.LVB{2}
	l := &lock{lvb: read, state: lockc.LVBValid}
	v, f := l.outgoing(lockc.NL, int(lockc.EX))
	assert.Equal(t, lockc.LVB{}, v, "up-conversions send zeros")
	assert.Zero(t, f)

	l.staged = &staged
	v, f = l.outgoing(lockc.EX, int(lockc.NL))
	assert.Equal(t, staged, v)
	assert.Zero(t, f)
	v, f = l.outgoing(lockc.PW, -1)
	assert.Equal(t, staged, v, "unlock from PW publishes")
	assert.Zero(t, f)
	v, _ = l.outgoing(lockc.PR, int(lockc.NL))
	assert.Equal(t, read, v, "PR→NL moves nothing: the copy, never the staged value")
	v, _ = l.outgoing(lockc.CR, -1)
	assert.Equal(t, read, v, "unlock below PW writes nothing")

	l.staged, l.invalid = nil, true
	v, f = l.outgoing(lockc.EX, int(lockc.EX))
	assert.Equal(t, read, v)
	assert.EqualValues(t, lkfIVValBlk, f, "a staged invalidation")

}

func TestKernelFlags(t *testing.T) {
	k, err := kernelFlags([]lockc.Flag{lockc.NoQueue | lockc.NoOrder, lockc.QueueConvert})
	assert.NoError(t, err)
	assert.EqualValues(t, lkfNoQueue|lkfNoOrder|lkfQueCvt, k)
	_, err = kernelFlags([]lockc.Flag{1 << 20})
	assert.ErrorIs(t, err, lockc.ErrBadRequest)
}

func TestIsUp(t *testing.T) {
	assert.True(t, lockc.IsUpConversion(lockc.NL, lockc.CR))
	assert.True(t, lockc.IsUpConversion(lockc.PR, lockc.CW))
	assert.True(t, lockc.IsUpConversion(lockc.CW, lockc.PR))
	assert.False(t, lockc.IsUpConversion(lockc.EX, lockc.EX))
	assert.False(t, lockc.IsUpConversion(lockc.PR, lockc.CR))
}
