package lockc

import "fmt"

// Mode is a lock mode.
type Mode uint8

// The DLM's lock modes, weakest first.
const (
	NL Mode = iota // null: holds the resource (and its LVB) without access
	CR             // concurrent read
	CW             // concurrent write
	PR             // protected read
	PW             // protected write
	EX             // exclusive
)

// String returns the DLM's name of m.
func (m Mode) String() string {
	switch m {
	case NL:
		return "NL"
	case CR:
		return "CR"
	case CW:
		return "CW"
	case PR:
		return "PR"
	case PW:
		return "PW"
	case EX:
		return "EX"
	}
	return fmt.Sprintf("Mode(%d)", uint8(m))
}

// Valid reports whether m is one of the six modes.
func (m Mode) Valid() bool { return m <= EX }

// allowed returns the set of requested modes (bit 1<<mode) that a lock
// granted in mode granted allows.
func allowed(granted Mode) uint8 {
	switch granted {
	case NL:
		return 1<<NL | 1<<CR | 1<<CW | 1<<PR | 1<<PW | 1<<EX
	case CR:
		return 1<<NL | 1<<CR | 1<<CW | 1<<PR | 1<<PW
	case CW:
		return 1<<NL | 1<<CR | 1<<CW
	case PR:
		return 1<<NL | 1<<CR | 1<<PR
	case PW:
		return 1<<NL | 1<<CR
	case EX:
		return 1 << NL
	}
	return 0
}

// Compatible reports whether a lock granted in mode granted allows another
// lock to be granted in mode requested (the DLM's compatibility matrix; it is
// symmetric).
func Compatible(granted, requested Mode) bool {
	if !granted.Valid() || !requested.Valid() {
		return false
	}
	return allowed(granted)&(1<<requested) != 0
}

// Covers reports whether holding mode held gives at least the access of mode
// want, so that a node holding held can serve a local request for want without
// asking the engine: every mode incompatible with want is also incompatible
// with held.
func Covers(held, want Mode) bool {
	if !held.Valid() || !want.Valid() {
		return false
	}
	for m := NL; m <= EX; m++ {
		if !Compatible(want, m) && Compatible(held, m) {
			return false
		}
	}
	return true
}

// IsUpConversion reports whether converting a lock from granted mode gr to
// rq must wait like a new request: rq is stronger, or it is the DLM's
// PR→CW, whose CW is not weaker than PR. Every other conversion is granted
// at once.
func IsUpConversion(gr, rq Mode) bool {
	return rq > gr || (gr == PR && rq == CW)
}
