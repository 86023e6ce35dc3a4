package etcd

import (
	"context"
	"encoding/hex"
	"fmt"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// WaitQueueLen returns once etcd holds exactly converting conversions and
// waiting new requests queued on resource in lockspace, and this Engine's
// lockspaces of that name have handled the changes that queued them (so
// their blocking notifications are out), or ctx ends. Test tool; a
// cluster's test waits on every node's Engine in turn.
func (e *Engine) WaitQueueLen(ctx context.Context, lockspace string, resource []byte, converting, waiting int) error {
	k := newLayout(e.o.Prefix, lockspace)
	keys := k.keysOf(resource)
	for {
		r, err := e.client.Get(ctx, keys.prefix, clientv3.WithPrefix())
		if err != nil {
			return fmt.Errorf("lockspace %s: resource %q: queues: %w", lockspace, resource, err)
		}
		v, err := newView(k, r.Kvs, r.Header.Revision)
		if err != nil {
			return fmt.Errorf("lockspace %s: resource %q: %w", lockspace, resource, err)
		}
		c, w := len(v.converting()), len(v.waiting())
		if c == converting && w == waiting {
			return e.Sync(ctx, lockspace)
		}
		wctx, cancel := context.WithCancel(ctx)
		ch := e.client.Watch(wctx, keys.prefix, clientv3.WithPrefix(), clientv3.WithRev(r.Header.Revision+1))
		select {
		case <-ch:
		case <-ctx.Done():
		}
		cancel()
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("lockspace %s: resource %q: want %d converting and %d waiting, have %d and %d: %w", lockspace, resource, converting, waiting, c, w, err)
		}
	}
}

// ResourceCount counts the resources that have any key in etcd under the
// Engine's prefix, over all lockspaces: locks, an LVB, or a dead writer's
// marker. Test tool for leak checks.
func (e *Engine) ResourceCount(ctx context.Context) (int, error) {
	r, err := e.client.Get(ctx, e.o.Prefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return 0, fmt.Errorf("etcd lock engine: count resources under %s: %w", e.o.Prefix, err)
	}
	seen := map[string]bool{}
	for _, kv := range r.Kvs {
		parts := strings.Split(strings.TrimPrefix(string(kv.Key), e.o.Prefix), "/")
		if len(parts) >= 4 && parts[1] == "r" {
			if _, err := hex.DecodeString(parts[2]); err == nil {
				seen[parts[0]+"/"+parts[2]] = true
			}
		}
	}
	return len(seen), nil
}
