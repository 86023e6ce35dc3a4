package inproc

import (
	"context"
	"testing"

	"github.com/clustersnap/clustersnap/lockc"
	"github.com/clustersnap/clustersnap/lockc/locktest"
)

// The suite passes on its token-free paths too (the linearizability check
// fencing stale holders by their loss alone, as for the kernel DLM), run
// here on this engine with its tokens hidden.
func TestConformanceWithoutTokens(t *testing.T) {
	locktest.Run(t, locktest.Harness{
		Name:       "inproc-tokenless",
		NewCluster: func(testing.TB) locktest.Cluster { return tokenless{NewCluster()} },
	})
}

// tokenless is a Cluster whose locks do not offer lockc.Tokener. It keeps
// the Cluster's test capabilities (Crash, WaitQueueLen, ResourceCount).
type tokenless struct{ *Cluster }

func (c tokenless) Node(id uint32) lockc.Engine { return tokenlessEngine{c.Cluster.Node(id)} }

type tokenlessEngine struct{ lockc.Engine }

func (e tokenlessEngine) Open(ctx context.Context, name string) (lockc.Lockspace, error) {
	ls, err := e.Engine.Open(ctx, name)
	if err != nil {
		return nil, err
	}
	return tokenlessSpace{ls}, nil
}

type tokenlessSpace struct{ lockc.Lockspace }

func (s tokenlessSpace) OnLost(f func()) { s.Lockspace.(lockc.LostNotifier).OnLost(f) }
func (s tokenlessSpace) IsLost() bool    { return s.Lockspace.(lockc.LostChecker).IsLost() }

func (s tokenlessSpace) Lock(ctx context.Context, res []byte, m lockc.Mode, flags ...lockc.Flag) (lockc.Lock, error) {
	l, err := s.Lockspace.Lock(ctx, res, m, flags...)
	if err != nil {
		return nil, err
	}
	return tokenlessLock{l}, nil
}

// tokenlessLock embeds the interface, so only lockc.Lock's methods show.
type tokenlessLock struct{ lockc.Lock }
