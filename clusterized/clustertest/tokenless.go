package clustertest

import (
	"context"

	"github.com/clustersnap/clustersnap/lockc"
	"github.com/clustersnap/clustersnap/lockc/locktest"
)

// withoutTokens returns the engine the stores of the suite use for node id
// of cluster: the cluster's engine, except that no lock it grants offers
// lockc.Tokener. The store under test sees the weakest contract an engine
// may offer (the kernel DLM's), whatever the engine, so a check that passes
// proves the store correct without fencing tokens. The lockspace keeps
// exactly the loss capabilities (LostNotifier, LostChecker) the engine's
// has, since the store takes a different path for each.
func withoutTokens(cluster locktest.Cluster, id uint32) lockc.Engine {
	return tokenlessEngine{cluster.Node(id)}
}

type tokenlessEngine struct{ lockc.Engine }

func (e tokenlessEngine) Open(ctx context.Context, name string) (lockc.Lockspace, error) {
	ls, err := e.Engine.Open(ctx, name)
	if err != nil {
		return nil, err
	}
	notifier, isNotifier := ls.(lockc.LostNotifier)
	checker, isChecker := ls.(lockc.LostChecker)
	base := tokenlessSpace{ls}
	switch {
	case isNotifier && isChecker:
		return struct {
			tokenlessSpace
			lockc.LostNotifier
			lockc.LostChecker
		}{base, notifier, checker}, nil
	case isNotifier:
		return struct {
			tokenlessSpace
			lockc.LostNotifier
		}{base, notifier}, nil
	case isChecker:
		return struct {
			tokenlessSpace
			lockc.LostChecker
		}{base, checker}, nil
	}
	return base, nil
}

// tokenlessSpace embeds the interface, so only lockc.Lockspace's methods
// show; its locks are tokenlessLocks.
type tokenlessSpace struct{ lockc.Lockspace }

func (s tokenlessSpace) Lock(ctx context.Context, res []byte, m lockc.Mode, flags ...lockc.Flag) (lockc.Lock, error) {
	l, err := s.Lockspace.Lock(ctx, res, m, flags...)
	if err != nil {
		return nil, err
	}
	return tokenlessLock{l}, nil
}

// tokenlessLock embeds the interface, so only lockc.Lock's methods show.
type tokenlessLock struct{ lockc.Lock }
