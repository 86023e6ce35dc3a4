package dlm

import (
	"context"
	"fmt"
	"time"
)

// watch runs the liveness probe until the lockspace is lost: every
// StallBound/3 it converts the probe lock NL→NL, and if the answer takes
// longer than StallBound it loses the lockspace. While the cluster
// controller has the lockspace stopped (for recovery after a node failure,
// or because this node lost quorum) the kernel blocks every request, so a
// stalled probe means this node can no longer be sure its locks are its
// own. A probe blocked in the kernel is abandoned on the loss: the write
// returns (or fails) once the device file is released.
func (ls *lockspace) watch() {
	bound := ls.e.o.StallBound
	tick := time.NewTicker(bound / 3)
	defer tick.Stop()
	for {
		select {
		case <-ls.lost:
			return
		case <-tick.C:
		}
		done := make(chan error, 1)
		go func() { done <- ls.barrier(context.Background()) }()
		stall := time.NewTimer(bound)
		select {
		case err := <-done:
			stall.Stop()
			if err != nil {
				ls.lose(fmt.Errorf("liveness probe: %w", err))
				return
			}
		case <-stall.C:
			ls.lose(errStalled)
			return
		case <-ls.lost:
			stall.Stop()
			return
		}
	}
}
