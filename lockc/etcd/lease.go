package etcd

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"

	"github.com/clustersnap/clustersnap/lockc"
)

// retryPause is how long the keep-alive waits after a failed attempt
// before the next one.
const retryPause = 100 * time.Millisecond

// keepAlive renews the lease every TTL/3 and ends the membership when it
// cannot renew it in time.
//
// Self-fencing: etcd expires a lease TTL after the server received its
// last keep-alive, and the server received it after the node sent it. So
// the lease cannot expire before sendTime + TTL of the last acknowledged
// keep-alive; the node declares itself lost Margin before that. Every
// keep-alive runs under a context that ends at the deadline, so the loss
// is declared on time however the network fails.
func (ls *lockspace) keepAlive() {
	defer ls.done.Done()
	interval := ls.ttl / 3
	next := interval
	for {
		now := time.Since(ls.base)
		fence := time.Duration(ls.fence.Load())
		if now >= fence {
			ls.end(fmt.Errorf("lockspace %s: node %d: lease %x not renewed within %v of its TTL %v (the server may expire it): %w",
				ls.name, ls.node, int64(ls.lease), ls.ttl-ls.e.o.Margin, ls.ttl, lockc.ErrLost))
			return
		}
		wait := min(next, fence) - now
		if wait > 0 {
			t := time.NewTimer(wait)
			select {
			case <-ls.ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
			continue
		}
		sent := time.Since(ls.base)
		ctx, cancel := context.WithTimeout(ls.ctx, fence-sent)
		r, err := ls.c.KeepAliveOnce(ctx, ls.lease)
		cancel()
		switch {
		case ls.ctx.Err() != nil:
			return
		case errors.Is(err, rpctypes.ErrLeaseNotFound):
			ls.end(fmt.Errorf("lockspace %s: node %d: lease %x expired on the server: %w", ls.name, ls.node, int64(ls.lease), lockc.ErrLost))
			return
		case err != nil:
			next = time.Since(ls.base) + retryPause
		default:
			ttl := time.Duration(r.TTL) * time.Second
			ls.fence.Store(int64(sent + ttl - ls.e.o.Margin))
			next = sent + interval
		}
	}
}
