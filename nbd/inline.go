package nbd

import (
	"sync/atomic"
	"time"
)

// inlineLimit is how long READs' or WRITEs' backend calls may recently have
// taken for the reader to run them itself instead of handing them to a
// worker. Handing off costs each request goroutine wake-ups and, while the
// worker's disk I/O and the reader's socket I/O are both in system calls, the
// runtime's moving of processors between threads: on a small machine that
// costs more CPU than the overlap gains when the data is in the page cache
// (copying 1 MiB to or from it takes 0.1 to 0.3 ms). Requests that wait for a
// disk or a commit take longer; they run on workers, where they overlap with
// later requests and writes can be committed together.
const inlineLimit = time.Millisecond

// costEstimate tracks how long a kind of request has recently taken in the
// backend, in nanoseconds: a slower request sets it, a quicker one moves it
// an eighth of the way down. Concurrent updates may lose one another's
// sample, which the estimate can afford.
type costEstimate struct{ ns atomic.Int64 }

// unprovenCost is where an estimate starts: above inlineLimit, so that a
// connection hands requests to workers until a run of them has been quick.
const unprovenCost = 2 * inlineLimit

// record folds in one request's backend time.
func (e *costEstimate) record(d time.Duration) {
	old := e.ns.Load()
	if int64(d) >= old {
		e.ns.Store(int64(d))
		return
	}
	e.ns.Store(old - (old-int64(d))/8)
}

// quick reports whether such requests have recently been quick enough to run
// inline.
func (e *costEstimate) quick() bool { return e.ns.Load() < int64(inlineLimit) }

// runsInline reports whether the reader should run req itself: a READ, or a
// WRITE without FUA, while such requests have been quick (see inlineLimit).
// A request run inline holds up the requests behind it, so one slow request
// is enough to hand its kind back to the workers, and it takes a run of quick
// ones to bring it back.
func (c *conn) runsInline(req *request) bool {
	if req.errno != 0 {
		return false
	}
	switch req.typ {
	case cmdRead:
		return c.readCost.quick()
	case cmdWrite:
		return req.flags&cmdFlagFUA == 0 && c.writeCost.quick()
	}
	return false
}
