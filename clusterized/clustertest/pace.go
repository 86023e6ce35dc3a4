package clustertest

import (
	"fmt"
	"sync"
	"time"
)

// paceBound bounds one wait of a node for the others to catch up, so that
// a pacing bug fails the run instead of hanging it. A wait lasts as long
// as a few lock transfers between nodes; the bound is far above that even
// for guests under software emulation.
const paceBound = 2 * time.Minute

// pacer keeps the nodes of a run within lead operations of each other: a
// worker whose node has completed more than lead operations beyond another
// node still running waits, between operations (holding nothing in the
// store), until that node catches up. Without it a node that holds the
// lock can run its whole share of the workload in one tenure whenever the
// engine moves the lock more slowly than the node works (the kernel DLM
// across guests), and the nodes' operations barely interleave. A node
// stops counting when all its workers have returned or it crashed; a lead
// of 0 or less paces nothing.
type pacer struct {
	lead int64

	mu      sync.Mutex
	done    map[uint32]int64 // operations completed, by running node
	workers map[uint32]int   // workers not yet returned, by running node
	changed chan struct{}    // closed and replaced when done changes
}

func newPacer(lead int) *pacer {
	return &pacer{lead: int64(lead), done: map[uint32]int64{}, workers: map[uint32]int{}, changed: make(chan struct{})}
}

// notifyLocked wakes every waiter. p.mu must be held.
func (p *pacer) notifyLocked() {
	close(p.changed)
	p.changed = make(chan struct{})
}

// add counts a worker of node id; call it before any worker of the run
// starts.
func (p *pacer) add(id uint32) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.workers[id]++
	p.done[id] += 0
}

// exit records that a worker of node id returned; the node stops counting
// when its last one has.
func (p *pacer) exit(id uint32) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.workers[id]--; p.workers[id] <= 0 {
		p.stopLocked(id)
	}
}

// stop takes node id out of the pacing: it crashed.
func (p *pacer) stop(id uint32) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.stopLocked(id)
}

func (p *pacer) stopLocked(id uint32) {
	delete(p.done, id)
	delete(p.workers, id)
	p.notifyLocked()
}

// did records an operation completed by node id.
func (p *pacer) did(id uint32) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, running := p.done[id]; running {
		p.done[id]++
		p.notifyLocked()
	}
}

// wait returns once node id may start another operation, or an error
// after paceBound.
func (p *pacer) wait(id uint32) error {
	var timer *time.Timer
	for {
		p.mu.Lock()
		ahead, behind := p.aheadLocked(id)
		changed := p.changed
		p.mu.Unlock()
		if !ahead {
			return nil
		}
		if timer == nil {
			timer = time.NewTimer(paceBound)
			defer timer.Stop()
		}
		select {
		case <-changed:
		case <-timer.C:
			return fmt.Errorf("node %d waited %v for node %d to catch up", id, paceBound, behind)
		}
	}
}

// aheadLocked reports whether node id is more than lead operations ahead
// of another running node, and of which. p.mu must be held.
func (p *pacer) aheadLocked(id uint32) (bool, uint32) {
	mine, running := p.done[id]
	if p.lead <= 0 || !running {
		return false, 0
	}
	for other, n := range p.done {
		if other != id && mine-n > p.lead {
			return true, other
		}
	}
	return false, 0
}
