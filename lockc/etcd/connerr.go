package etcd

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
)

// The etcd client turns a call that ran out of time into the bare context
// error, dropping gRPC's own, which says why no connection was ready: a
// TLS handshake that failed, a certificate the server refused or the client
// does not trust, an endpoint that refused the connection. A node whose
// Open fails for such a reason must say so, so the engine's client keeps
// gRPC's error for calls whose context asks for it (connErrs), and Open
// adds it to its own.

// connErrsKey is the context key of a *connErrs.
type connErrsKey struct{}

// connErrs holds the last error gRPC returned to the calls made with one
// context.
type connErrs struct {
	mu   sync.Mutex
	last error
}

// withConnErrs returns a context whose calls through an Engine's own
// client keep their gRPC errors in the connErrs returned.
func withConnErrs(ctx context.Context) (context.Context, *connErrs) {
	ce := &connErrs{}
	return context.WithValue(ctx, connErrsKey{}, ce), ce
}

// keepConnErrs is a unary interceptor, placed inside the etcd client's
// own (which retries and replaces errors), that keeps each failed call's
// gRPC error in its context's connErrs.
func keepConnErrs(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	err := invoker(ctx, method, req, reply, cc, opts...)
	if ce, ok := ctx.Value(connErrsKey{}).(*connErrs); ok && err != nil {
		ce.mu.Lock()
		ce.last = err
		ce.mu.Unlock()
	}
	return err
}

// explain returns err, which a call made with ce's context returned,
// with the reason gRPC gave if err is only the context's end.
func (ce *connErrs) explain(err error) error {
	if !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, context.Canceled) {
		return err
	}
	ce.mu.Lock()
	last := ce.last
	ce.mu.Unlock()
	if last == nil {
		return err
	}
	s, ok := status.FromError(last)
	if !ok || s.Message() == err.Error() {
		return err
	}
	return fmt.Errorf("%w (%s)", err, s.Message())
}
