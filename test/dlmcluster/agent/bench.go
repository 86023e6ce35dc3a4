package main

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/clustersnap/clustersnap/lockc"
	"github.com/clustersnap/clustersnap/lockc/dlm"
)

// bench runs methodCached or methodPingPong in this guest, timed here so
// that the host's link to the agent is no part of the figures. Each owner is
// an Engine (a device file) of its own, closed at the end.
func (a *agent) bench(ctx context.Context, method, lockspace string, resource []byte, args []int) (int, error) {
	owners, ms := 1, 0
	switch {
	case method == methodCached && len(args) == 1:
		ms = args[0]
	case method == methodPingPong && len(args) == 2:
		owners, ms = args[0], args[1]
	default:
		return 0, fmt.Errorf("%s: arguments %v: %w", method, args, lockc.ErrBadRequest)
	}
	locks := make([]lockc.Lock, owners)
	for i := range locks {
		ls, err := dlm.New(a.opts).Open(ctx, lockspace)
		if err != nil {
			return 0, err
		}
		defer ls.Close()
		if locks[i], err = ls.Lock(ctx, resource, lockc.NL); err != nil {
			return 0, err
		}
	}
	deadline := time.Now().Add(time.Duration(ms) * time.Millisecond)
	var count atomic.Int64
	var wg sync.WaitGroup
	errs := make([]error, owners)
	for i, l := range locks {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := uint64(0); time.Now().Before(deadline); n++ {
				if method == methodCached {
					if errs[i] = l.Convert(ctx, lockc.CR); errs[i] != nil {
						return
					}
				} else {
					if errs[i] = l.Convert(ctx, lockc.EX); errs[i] != nil {
						return
					}
					var v lockc.LVB
					v[0] = byte(n)
					l.SetLVB(v)
				}
				if errs[i] = l.Convert(ctx, lockc.NL); errs[i] != nil {
					return
				}
				count.Add(1)
			}
		}()
	}
	wg.Wait()
	return int(count.Load()), errors.Join(errs...)
}
