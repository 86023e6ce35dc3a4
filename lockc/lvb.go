package lockc

import "fmt"

// LVBSize is the size of a lock value block, as for the DLM's userspace
// lockspaces.
const LVBSize = 32

// LVB is a lock value block.
type LVB [LVBSize]byte

// LVBState says how far an LVB can be trusted.
type LVBState uint8

const (
	// LVBUnknown: the resource has no value yet (fresh, or forgotten after
	// every lock on it was released); the LVB reads as zeros.
	LVBUnknown LVBState = iota
	// LVBValid: the value a PW or EX holder last published.
	LVBValid
	// LVBInvalid: a PW or EX holder died, or one invalidated the value on
	// purpose, since the last publish (the DLM's VALNOTVALID). It stays
	// invalid until the next PW or EX publish.
	LVBInvalid
)

// String names s.
func (s LVBState) String() string {
	switch s {
	case LVBUnknown:
		return "unknown"
	case LVBValid:
		return "valid"
	case LVBInvalid:
		return "invalid"
	}
	return fmt.Sprintf("LVBState(%d)", uint8(s))
}

// LVBMove is what a grant or conversion does with the LVB.
type LVBMove uint8

const (
	// LVBStays: the LVB moves neither way.
	LVBStays LVBMove = iota
	// LVBRead: the resource's LVB is copied into the lock.
	LVBRead
	// LVBWrite: the lock's LVB (or its invalidation) is published to the
	// resource.
	LVBWrite
)

// LVBMoveOf is the DLM's dlm_lvb_operations table for a conversion from
// granted mode gr to rq: only PW and EX write (on every conversion except
// PW→EX, which reads), and every other conversion to the same or a
// stronger mode in the order NL..EX reads (so PR→CW moves nothing). A new
// lock reads.
func LVBMoveOf(gr, rq Mode) LVBMove {
	switch {
	case gr == EX, gr == PW && rq != EX:
		return LVBWrite
	case rq >= gr:
		return LVBRead
	}
	return LVBStays
}
