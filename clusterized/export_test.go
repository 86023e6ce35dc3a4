package clusterized

import "github.com/clustersnap/clustersnap/lockc"

// LazyWaitingOutsideEX reports whether lazily committed exceptions may
// wait to be written while the node does not hold EX, which must never
// be. Under mu the mode cannot change, and outside EX no lazy commit can
// happen, so the answer is not a race.
func (s *Store) LazyWaitingOutsideEX() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return modeOf(s.state.Load()) != lockc.EX && s.lazyWaiting()
}

// UsersInside is the number of users the gate counts inside.
func (s *Store) UsersInside() uint64 { return s.usersInside() }
