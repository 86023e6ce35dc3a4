package lockc

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

// The DLM's matrix, written out row by row as specs/locks.md §1 gives it.
func TestCompatibleMatrix(t *testing.T) {
	rows := map[Mode]string{
		NL: "YYYYYY",
		CR: "YYYYY-",
		CW: "YYY---",
		PR: "YY-Y--",
		PW: "YY----",
		EX: "Y-----",
	}
	for gr, row := range rows {
		for rq := NL; rq <= EX; rq++ {
			assert.Equal(t, row[rq] == 'Y', Compatible(gr, rq), "%v granted, %v requested", gr, rq)
			assert.Equal(t, Compatible(gr, rq), Compatible(rq, gr), "symmetry %v/%v", gr, rq)
		}
	}
	assert.False(t, Compatible(Mode(6), NL))
	assert.False(t, Compatible(NL, Mode(6)))
}

func TestCovers(t *testing.T) {
	assert.True(t, Covers(EX, CR))
	assert.True(t, Covers(EX, PW))
	assert.True(t, Covers(PR, CR))
	assert.True(t, Covers(CR, CR))
	assert.True(t, Covers(CR, NL))
	assert.False(t, Covers(CR, PR))
	assert.False(t, Covers(NL, CR))
	// CW and PR are not ordered: neither covers the other.
	assert.False(t, Covers(CW, PR))
	assert.False(t, Covers(PR, CW))
	assert.False(t, Covers(Mode(9), NL))
}

func TestNames(t *testing.T) {
	assert.Equal(t, "EX", EX.String())
	assert.Equal(t, "Mode(7)", Mode(7).String())
	assert.Equal(t, "invalid", LVBInvalid.String())
	assert.Equal(t, "unknown", LVBUnknown.String())
}
