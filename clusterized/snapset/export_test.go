package snapset

// setMutation breaks m on purpose (mutants_test.go); call it right after
// Join, before any change of the set.
func setMutation(m *Member, mut mutation) { m.mut = mut }

// onDrainWait has f called when a drain of m starts to wait for the
// changes inside; call it right after Join.
func onDrainWait(m *Member, f func()) { m.drainWaits = f }
