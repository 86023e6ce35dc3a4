package clusterized

import (
	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/lockc"
)

// LazyWaitingOutsideEX reports whether lazily committed exceptions wait
// to be written while the node does not hold EX, which must never be. It
// asks the core, not the lock manager's guess (dirty). Under mu the
// mode cannot change, and outside EX no lazy commit can happen, so the
// answer is not a race.
func (s *Store) LazyWaitingOutsideEX() bool {
	s.mgr.mu.Lock()
	defer s.mgr.mu.Unlock()
	return s.mode() != lockc.EX && s.LazyWaiting()
}

// LazyWaiting reports whether the core has lazily committed exceptions
// that are not written yet: some exception it knows is not Durable. An
// invalid core writes nothing more, so nothing waits in it.
func (s *Store) LazyWaiting() bool {
	lazy := s.core.Load().lazy
	if lazy == nil || s.core.Load().s.Err() != nil {
		return false
	}
	waiting := false
	s.core.Load().s.Walk(func(e exstore.Exception) bool {
		waiting = !lazy.Durable(e.New)
		return !waiting
	})
	return waiting
}

// UsersInside is the number of users the gate counts inside.
func (s *Store) UsersInside() uint64 { return s.usersInside() }

// Holders is what a drain waits for: the users the gate counts inside and
// the prepared exceptions the core counts as unsettled.
func (s *Store) Holders() int { return int(s.usersInside()) + s.unsettled() }
