package etcd

import (
	"context"
	"encoding/hex"
	"fmt"
	"strings"
	"sync"
	"testing"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/clustersnap/clustersnap/lockc"
	"github.com/clustersnap/clustersnap/lockc/etcd/etcdtest"
	"github.com/clustersnap/clustersnap/lockc/locktest"
)

// testCluster is a locktest.Cluster of nodes that are Engines on one etcd
// cluster, each with its own client (its own connections), under a key
// prefix of their own.
type testCluster struct {
	tb        testing.TB
	endpoints []string
	o         Options
	admin     *clientv3.Client

	mu    sync.Mutex
	nodes map[uint32]*Engine
}

var (
	_ locktest.Crasher         = (*testCluster)(nil)
	_ locktest.QueueWaiter     = (*testCluster)(nil)
	_ locktest.ResourceCounter = (*testCluster)(nil)
)

// newTestCluster returns a cluster on endpoints whose engines use o
// (Prefix is set to one no other cluster uses).
func newTestCluster(tb testing.TB, endpoints []string, o Options) *testCluster {
	admin, err := clientv3.New(clientv3.Config{Endpoints: endpoints, Logger: quietLogger()})
	if err != nil {
		tb.Fatal(err)
	}
	o.Prefix = fmt.Sprintf("/t/%s/", strings.ReplaceAll(tb.Name(), "/", "."))
	o.Endpoints = endpoints
	c := &testCluster{tb: tb, endpoints: endpoints, o: o, admin: admin, nodes: map[uint32]*Engine{}}
	tb.Cleanup(func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		for _, e := range c.nodes {
			e.Close()
		}
		admin.Close()
	})
	return c
}

func (c *testCluster) Node(id uint32) lockc.Engine { return c.engine(id) }

func (c *testCluster) engine(id uint32) *Engine {
	c.mu.Lock()
	defer c.mu.Unlock()
	e := c.nodes[id]
	if e == nil {
		var err error
		e, err = New(c.o)
		if err != nil {
			c.tb.Fatalf("node %d: %v", id, err)
		}
		c.nodes[id] = e
	}
	return e
}

func (c *testCluster) all() []*Engine {
	c.mu.Lock()
	defer c.mu.Unlock()
	var es []*Engine
	for _, e := range c.nodes {
		es = append(es, e)
	}
	return es
}

// Crash revokes node id's leases and waits until the other nodes have seen
// its locks go.
func (c *testCluster) Crash(id uint32) {
	c.engine(id).Crash()
	ctx, cancel := context.WithTimeout(context.Background(), attemptTimeout)
	defer cancel()
	r, err := c.admin.Get(ctx, c.o.Prefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		c.tb.Errorf("crash node %d: %v", id, err)
		return
	}
	spaces := map[string]bool{}
	for _, kv := range r.Kvs {
		name, _, _ := strings.Cut(strings.TrimPrefix(string(kv.Key), c.o.Prefix), "/")
		spaces[name] = true
	}
	for _, e := range c.all() {
		for _, ls := range e.open() {
			if err := ls.waitProcessed(ctx, r.Header.Revision); err != nil && !ls.IsLost() {
				c.tb.Errorf("crash node %d: %v", id, err)
			}
		}
	}
}

// WaitQueueLen waits until etcd holds exactly the queued requests asked
// for, then until every node has handled the changes that queued them.
func (c *testCluster) WaitQueueLen(ctx context.Context, lockspace string, resource []byte, converting, waiting int) error {
	k := newLayout(c.o.Prefix, lockspace).keysOf(resource)
	for {
		r, err := c.admin.Get(ctx, k.prefix, clientv3.WithPrefix())
		if err != nil {
			return err
		}
		v, err := newView(newLayout(c.o.Prefix, lockspace), r.Kvs, r.Header.Revision)
		if err != nil {
			return err
		}
		if len(v.converting()) == converting && len(v.waiting()) == waiting {
			for _, e := range c.all() {
				if err := e.Sync(ctx, lockspace); err != nil {
					return err
				}
			}
			return nil
		}
		wctx, cancel := context.WithCancel(ctx)
		ch := c.admin.Watch(wctx, k.prefix, clientv3.WithPrefix(), clientv3.WithRev(r.Header.Revision+1))
		select {
		case <-ch:
		case <-ctx.Done():
		}
		cancel()
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("queue of %q: want %d converting, %d waiting; have %d, %d: %w", resource, converting, waiting, len(v.converting()), len(v.waiting()), err)
		}
	}
}

// ResourceCount counts the resources that have any key in etcd.
func (c *testCluster) ResourceCount() int {
	ctx, cancel := context.WithTimeout(context.Background(), attemptTimeout)
	defer cancel()
	r, err := c.admin.Get(ctx, c.o.Prefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		c.tb.Errorf("count resources: %v", err)
		return -1
	}
	seen := map[string]bool{}
	for _, kv := range r.Kvs {
		parts := strings.Split(strings.TrimPrefix(string(kv.Key), c.o.Prefix), "/")
		if len(parts) >= 3 && parts[1] == "r" {
			if _, err := hex.DecodeString(parts[2]); err == nil {
				seen[parts[0]+"/"+parts[2]] = true
			}
		}
	}
	return len(seen)
}

// harness runs the conformance suite on an etcd cluster at endpoints.
func harness(name string, endpoints func(tb testing.TB) []string, o Options) locktest.Harness {
	return locktest.Harness{
		Name: name,
		NewCluster: func(tb testing.TB) locktest.Cluster {
			return newTestCluster(tb, endpoints(tb), o)
		},
	}
}

// embedded starts one embedded etcd server per test binary's caller.
func embedded(n int) func(tb testing.TB) []string {
	return func(tb testing.TB) []string { return etcdtest.Start(tb, n).Endpoints() }
}
