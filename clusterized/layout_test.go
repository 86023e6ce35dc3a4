package clusterized

import (
	"testing"
	"unsafe"
)

// TestHotFieldsLayout checks the Store layout the hot paths rely on, for a
// Store that starts on a cache line: the core pointer and the gate's state
// and stop words (read by every lookup or write) share one line, which
// neither the user counters (written by every entry) nor the lock
// manager's fields reach.
func TestHotFieldsLayout(t *testing.T) {
	const line = 64
	var s Store
	g := unsafe.Offsetof(s.gate)
	first := unsafe.Offsetof(s.core)
	last := g + unsafe.Offsetof(s.gate.halt) + unsafe.Sizeof(s.gate.halt) - 1
	for name, off := range map[string]uintptr{
		"state":   g + unsafe.Offsetof(s.gate.state),
		"stopped": g + unsafe.Offsetof(s.gate.stopped),
	} {
		if off < first || off > last {
			t.Errorf("%s at %d is not between the core pointer (%d) and halt (%d)", name, off, first, last)
		}
	}
	if first/line != last/line {
		t.Errorf("the hot fields span bytes %d to %d, more than one line", first, last)
	}
	hot := first / line
	if end := unsafe.Offsetof(s.lostCheck) + unsafe.Sizeof(s.lostCheck) - 1; end/line == hot {
		t.Errorf("the fields before the core pointer reach the hot line (byte %d)", end)
	}
	for i := range s.gate.users {
		off := g + unsafe.Offsetof(s.gate.users) + uintptr(i)*unsafe.Sizeof(s.gate.users[i])
		end := off + unsafe.Sizeof(s.gate.users[i].n) - 1
		if off/line == hot || end/line == hot {
			t.Errorf("user counter %d at %d is on the hot line", i, off)
		}
	}
	if off := unsafe.Offsetof(s.mgr); off/line == hot {
		t.Errorf("the lock manager at %d is on the hot line", off)
	}
}
