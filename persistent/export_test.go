package persistent

// FlushMutant names a broken placement of the flush before the metadata
// write, for the crash tests' self-tests.
type FlushMutant = flushMutant

// The flush placements the crash checker must catch.
const (
	MutantFlushAfterMetadata = flushAfterMetadata
	MutantFlushNever         = flushNever
)

// SetFlushMutant makes s flush where m says from its next batch on.
func SetFlushMutant(s *Store, m FlushMutant) {
	s.metaMu.Lock()
	defer s.metaMu.Unlock()
	s.flushMutant = m
}
