package nbd

import (
	"slices"
	"strings"
	"sync/atomic"
)

// ExportStats are the serving counters of one export, since it was added.
// A request is counted under its command when it is answered successfully,
// and under Errors when it is answered with an error (refused requests
// included); CACHE hints are counted under neither.
type ExportStats struct {
	Name string
	// ConnectionsOpen counts the connections using the export now;
	// ConnectionsTotal every connection that selected it.
	ConnectionsOpen  uint64
	ConnectionsTotal uint64
	// Reads and Writes count the READ and WRITE requests, ReadBytes and
	// WrittenBytes their lengths.
	Reads, ReadBytes     uint64
	Writes, WrittenBytes uint64
	// Flushes, Trims, Zeroes and BlockStatus count the FLUSH, TRIM,
	// WRITE_ZEROES and BLOCK_STATUS requests.
	Flushes, Trims, Zeroes, BlockStatus uint64
	// Errors counts the requests answered with an error.
	Errors uint64
}

// Stats returns the counters of the exports served now, sorted by name. An
// export removed and added again starts from zero.
func (s *Server) Stats() []ExportStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]ExportStats, 0, len(s.exports))
	index := make(map[*export]int, len(s.exports))
	for _, x := range s.exports {
		st := x.ended
		st.Name = x.Name
		st.ConnectionsTotal = x.connections
		index[x] = len(out)
		out = append(out, st)
	}
	for c := range s.conns {
		if i, ok := index[c.bound]; ok {
			out[i].ConnectionsOpen++
			c.counters.addTo(&out[i])
		}
	}
	slices.SortFunc(out, func(a, b ExportStats) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// connCounters are one connection's counts of what ExportStats counts. Each
// connection has its own, so that connections do not contend for them;
// Stats adds them up, and a connection's are added to its export's when it
// ends.
type connCounters struct {
	reads, readBytes     atomic.Uint64
	writes, writtenBytes atomic.Uint64
	flushes, trims       atomic.Uint64
	zeroes, blockStatus  atomic.Uint64
	errors               atomic.Uint64
}

// addTo adds the counts to st.
func (k *connCounters) addTo(st *ExportStats) {
	st.Reads += k.reads.Load()
	st.ReadBytes += k.readBytes.Load()
	st.Writes += k.writes.Load()
	st.WrittenBytes += k.writtenBytes.Load()
	st.Flushes += k.flushes.Load()
	st.Trims += k.trims.Load()
	st.Zeroes += k.zeroes.Load()
	st.BlockStatus += k.blockStatus.Load()
	st.Errors += k.errors.Load()
}

// countSuccess counts a request of type typ answered successfully.
func (k *connCounters) countSuccess(typ uint16, length int64) {
	switch typ {
	case cmdRead:
		k.reads.Add(1)
		k.readBytes.Add(uint64(length))
	case cmdWrite:
		k.writes.Add(1)
		k.writtenBytes.Add(uint64(length))
	case cmdFlush:
		k.flushes.Add(1)
	case cmdTrim:
		k.trims.Add(1)
	case cmdWriteZeroes:
		k.zeroes.Add(1)
	case cmdBlockStatus:
		k.blockStatus.Add(1)
	}
}
