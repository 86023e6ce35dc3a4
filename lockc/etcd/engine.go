package etcd

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"

	"github.com/clustersnap/clustersnap/lockc"
)

// Defaults for Options' zero values.
const (
	// DefaultPrefix is where lockspaces live in etcd's key space.
	DefaultPrefix = "/clustersnap/lockc/"
	// DefaultTTL is the lease's time to live: how long after its last
	// acknowledged keep-alive a silent node keeps its locks on the server.
	DefaultTTL = 10 * time.Second
	// DefaultDialTimeout bounds the first connection to the endpoints.
	DefaultDialTimeout = 5 * time.Second
)

// Options configure an Engine.
type Options struct {
	// Endpoints are etcd's client URLs (http://, https://, unix://).
	Endpoints []string
	// TLS, if set, secures the connections (client certificate, CA).
	TLS *tls.Config
	// Prefix is the key prefix under which lockspaces live; ""
	// means DefaultPrefix. Every node of a cluster uses the same.
	Prefix string
	// TTL is the lease's time to live (whole seconds; the server may
	// grant more); 0 means DefaultTTL.
	TTL time.Duration
	// Margin is how long before the lease can expire on the server the
	// node declares itself lost and stops I/O; 0 means TTL/4 (at least
	// 500 ms). It must cover the time the node needs to stop writing.
	Margin time.Duration
	// DialTimeout bounds connecting to the endpoints, and Open's wait
	// for etcd to answer; 0 means DefaultDialTimeout.
	DialTimeout time.Duration
	// Client, if set, is used instead of dialing Endpoints, and is not
	// closed by Close (tests share one).
	Client *clientv3.Client
}

// Engine joins etcd lockspaces for one node. Each Open is its own
// membership with its own lease: several Engines (or several Opens) in one
// process hold locks independently, as separate processes would.
type Engine struct {
	o      Options
	client *clientv3.Client
	owned  bool // Close closes client

	mu     sync.Mutex
	spaces map[*lockspace]struct{} // open memberships

	// noSelfFence breaks the engine on purpose, as a test hook: the
	// keep-alive never declares the loss at the self-fencing deadline, so
	// a node cut off from etcd keeps its locks, in its own eyes, after
	// the server has expired its lease. Only the loss tests set it, to
	// show that their checks catch such a node.
	noSelfFence bool
}

var _ lockc.Engine = (*Engine)(nil)

// New connects to etcd as o says. It does not wait for a server to answer:
// the first Open does.
func New(o Options) (*Engine, error) {
	if o.Prefix == "" {
		o.Prefix = DefaultPrefix
	}
	if o.TTL <= 0 {
		o.TTL = DefaultTTL
	}
	if o.TTL < time.Second {
		return nil, fmt.Errorf("etcd lock engine: lease TTL %v: want at least 1s", o.TTL)
	}
	if o.Margin <= 0 {
		o.Margin = max(o.TTL/4, 500*time.Millisecond)
	}
	if o.Margin >= o.TTL {
		return nil, fmt.Errorf("etcd lock engine: margin %v: want less than the lease TTL %v", o.Margin, o.TTL)
	}
	if o.DialTimeout <= 0 {
		o.DialTimeout = DefaultDialTimeout
	}
	if o.Client != nil {
		return &Engine{o: o, client: o.Client, spaces: map[*lockspace]struct{}{}}, nil
	}
	if len(o.Endpoints) == 0 {
		return nil, errors.New("etcd lock engine: no endpoints")
	}
	c, err := clientv3.New(clientv3.Config{
		Endpoints:   o.Endpoints,
		TLS:         o.TLS,
		DialTimeout: o.DialTimeout,
		Logger:      quietLogger(),
		DialOptions: []grpc.DialOption{grpc.WithChainUnaryInterceptor(keepConnErrs)},
	})
	if err != nil {
		return nil, fmt.Errorf("etcd lock engine: endpoints %v: %w", o.Endpoints, err)
	}
	return &Engine{o: o, client: c, owned: true, spaces: map[*lockspace]struct{}{}}, nil
}

// Close closes the lockspaces still open (as their Close does) and the
// connection to etcd if the Engine made it.
func (e *Engine) Close() error {
	var errs []error
	for _, ls := range e.open() {
		errs = append(errs, ls.Close())
	}
	if e.owned {
		errs = append(errs, e.client.Close())
	}
	return errors.Join(errs...)
}

// open returns the memberships not yet ended.
func (e *Engine) open() []*lockspace {
	e.mu.Lock()
	defer e.mu.Unlock()
	spaces := make([]*lockspace, 0, len(e.spaces))
	for ls := range e.spaces {
		spaces = append(spaces, ls)
	}
	return spaces
}

// Crash simulates the death of this node's process: every lockspace the
// Engine has open is lost (OnLost functions, then IsLost, then Lost) and
// its lease is revoked without unlocking anything, so that etcd drops its
// locks as it would when the lease expired, and leaves the writer markers
// of its PW and EX locks behind. Test tool.
func (e *Engine) Crash() {
	for _, ls := range e.open() {
		ls.crash()
	}
}

// Sync returns once this Engine's lockspaces of that name have handled
// every change etcd had committed before the call (it writes a marker
// under the lockspaces' resources and waits for the watches to see it), or
// ctx ends. Test tool for knowing that blocking notifications have arrived.
func (e *Engine) Sync(ctx context.Context, name string) error {
	k := newLayout(e.o.Prefix, name)
	marker := k.resources() + ".sync"
	var r *clientv3.PutResponse
	if err := retry(ctx, func() (err error) { // the marker may be written twice
		r, err = e.client.Put(ctx, marker, "")
		return err
	}); err != nil {
		return fmt.Errorf("lockspace %s: sync: %w", name, err)
	}
	defer e.client.Delete(context.WithoutCancel(ctx), marker)
	for _, ls := range e.open() {
		if ls.name != name {
			continue
		}
		if err := ls.waitProcessed(ctx, r.Header.Revision); err != nil && !ls.IsLost() {
			return fmt.Errorf("lockspace %s: sync: %w", name, err)
		}
	}
	return nil
}
