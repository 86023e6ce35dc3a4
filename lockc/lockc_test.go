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

// LVBMoveOf is the DLM's dlm_lvb_operations table.
func TestLVBMoveOf(t *testing.T) {
	rows := []string{
		"rrrrrr", // NL
		"-rrrrr", // CR
		"--rrrr", // CW
		"---rrr", // PR
		"wwwwwr", // PW
		"wwwwww", // EX
	}
	want := map[byte]LVBMove{'r': LVBRead, 'w': LVBWrite, '-': LVBStays}
	for gr, row := range rows {
		for rq := range row {
			assert.Equal(t, want[row[rq]], LVBMoveOf(Mode(gr), Mode(rq)), "%v→%v", Mode(gr), Mode(rq))
		}
	}
}

// Up-conversions are the stronger modes and PR→CW (u: up), written out.
func TestIsUpConversion(t *testing.T) {
	rows := []string{
		"-uuuuu", // NL
		"--uuuu", // CR
		"---uuu", // CW
		"--u-uu", // PR
		"-----u", // PW
		"------", // EX
	}
	for gr, row := range rows {
		for rq := range row {
			assert.Equal(t, row[rq] == 'u', IsUpConversion(Mode(gr), Mode(rq)), "%v→%v", Mode(gr), Mode(rq))
		}
	}
	assert.Equal(t, NoQueue|NoOrder, JoinFlags(NoQueue, NoOrder))
	assert.Equal(t, Flag(0), JoinFlags())
}
