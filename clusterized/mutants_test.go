package clusterized_test

import (
	"context"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/clusterized"
	"github.com/clustersnap/clustersnap/clusterized/clustertest"
	"github.com/clustersnap/clustersnap/exstore"
)

// failureRecorder is a testing.TB that records failures instead of
// failing the test: a checker run through it against a mutant must fail.
// FailNow ends the goroutine, as testing.T's does, so checkers run in one
// of their own (runChecker). A skip is recorded too, for the test's own
// goroutine to pass on (a test may skip only from its own goroutine).
type failureRecorder struct {
	testing.TB
	mu      sync.Mutex
	failed  bool
	msgs    []string
	skipped string // why the checker skipped, "" if it did not
}

func (r *failureRecorder) record(msg string) {
	r.mu.Lock()
	r.failed = true
	if msg != "" {
		r.msgs = append(r.msgs, msg)
	}
	r.mu.Unlock()
}

func (r *failureRecorder) Error(args ...any)                 { r.record(fmt.Sprint(args...)) }
func (r *failureRecorder) Errorf(format string, args ...any) { r.record(fmt.Sprintf(format, args...)) }
func (r *failureRecorder) Fail()                             { r.record("") }
func (r *failureRecorder) FailNow()                          { r.record(""); runtime.Goexit() }
func (r *failureRecorder) Fatal(args ...any)                 { r.Error(args...); runtime.Goexit() }
func (r *failureRecorder) Fatalf(format string, args ...any) {
	r.Errorf(format, args...)
	runtime.Goexit()
}

func (r *failureRecorder) Skip(args ...any) { r.skip(fmt.Sprint(args...)) }
func (r *failureRecorder) SkipNow()         { r.skip("skipped") }
func (r *failureRecorder) Skipf(format string, args ...any) {
	r.skip(fmt.Sprintf(format, args...))
}

// skip records why the checker skipped and ends its goroutine.
func (r *failureRecorder) skip(why string) {
	r.mu.Lock()
	r.skipped = why
	r.mu.Unlock()
	runtime.Goexit()
}

// Skipped reports whether the checker skipped.
func (r *failureRecorder) Skipped() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.skipped != ""
}

func (r *failureRecorder) Failed() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.failed
}

// summary is the failures recorded, their testify messages (or first
// lines) only.
func (r *failureRecorder) summary() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, msg := range r.msgs {
		line, _, _ := strings.Cut(strings.TrimSpace(msg), "\n")
		for l := range strings.Lines(msg) {
			if _, m, ok := strings.Cut(l, "Messages:"); ok {
				line = m
			}
		}
		out = append(out, strings.TrimSpace(line))
	}
	return strings.Join(out, "; ")
}

// runChecker runs check through a failureRecorder over t and returns it.
func runChecker(t *testing.T, check func(testing.TB)) *failureRecorder {
	r := &failureRecorder{TB: t}
	done := make(chan struct{})
	go func() {
		defer close(done)
		check(r)
	}()
	<-done
	return r
}

// coreMutant names a deliberate bug of a node's core, "" for none.
type coreMutant string

const (
	// ignoresWord: PrepareIfUnchanged allocates whatever the word says.
	ignoresWord coreMutant = "conditional prepare ignores its word"
	// ignoresUnsettled: Unsettled is always 0, so a drain does not wait
	// for prepared exceptions.
	ignoresUnsettled coreMutant = "drain ignores unsettled exceptions"
	// skipsRefresh: Refresh does nothing, so a node keeps a stale view
	// of the metadata after another node's EX.
	skipsRefresh coreMutant = "skips the refresh"
)

// mutatedCore is the suite's core with the mutant's bug, and every
// capability of the persistent store.
type mutatedCore struct {
	clustertest.Core
	mutant coreMutant
}

func (c mutatedCore) PrepareIfUnchanged(ctx context.Context, old exstore.Chunk, word *atomic.Uint64, want uint64) (exstore.Exception, error) {
	if c.mutant == ignoresWord {
		var own atomic.Uint64
		own.Store(want)
		word = &own
	}
	return c.Core.PrepareIfUnchanged(ctx, old, word, want)
}

func (c mutatedCore) Unsettled() int {
	if c.mutant == ignoresUnsettled {
		return 0
	}
	return c.Core.Unsettled()
}

func (c mutatedCore) Refresh(ctx context.Context) error {
	if c.mutant == skipsRefresh {
		return nil
	}
	return c.Core.Refresh(ctx)
}

var _ exstore.ConditionalPreparer = mutatedCore{}

// withCoreMutant returns h with its nodes' cores (the first and every
// reload's) carrying mutant's bug: node A's (1) only, or every node's with
// onEveryNode.
func withCoreMutant(h clustertest.Harness, mutant coreMutant, onEveryNode bool) clustertest.Harness {
	h.WrapCore = func(id uint32, core clustertest.Core) exstore.Store {
		if id != 1 && !onEveryNode {
			return core
		}
		return mutatedCore{core, mutant}
	}
	return h
}

// staleTokenStore is a clustered store that accepts every optimistic
// token: it never tells a reader that another node may have changed its
// answers.
type staleTokenStore struct{ *clusterized.LazyStore }

func (staleTokenStore) Unchanged(uint64) bool { return true }

var _ exstore.OptimisticLookuper = staleTokenStore{}

// acceptsStaleTokens returns h with node A's (1) COW engine over a
// staleTokenStore.
func acceptsStaleTokens(h clustertest.Harness) clustertest.Harness {
	h.WrapEngineStore = func(id uint32, s exstore.Store) exstore.Store {
		if id != 1 {
			return s
		}
		return staleTokenStore{s.(*clusterized.LazyStore)}
	}
	return h
}

// TestMultiNodeCheckerCatchesMutants runs the checks of the multi-node
// suite that force a race with a hook against deliberately broken
// variants of the store, each of which must fail the check that applies.
// (The suite runs the same checks against the store as it is in
// TestMultiNode.)
func TestMultiNodeCheckerCatchesMutants(t *testing.T) {
	checkCatchesMutants(t, inprocHarness())
}

// TestMultiNodeKernelDLMCatchesMutants is
// TestMultiNodeCheckerCatchesMutants on the kernel DLM (in a guest:
// test/dlm), where the checks' hooks race real lock traffic.
func TestMultiNodeKernelDLMCatchesMutants(t *testing.T) {
	checkCatchesMutants(t, kernelDLMHarness())
}

// checkCatchesMutants runs each mutant against the check that applies, on
// h's engine, and fails unless the check fails.
func checkCatchesMutants(t *testing.T, h clustertest.Harness) {
	for _, tc := range []struct {
		name  string
		check func(testing.TB) // the check, against the mutant
	}{
		{
			"accepts stale tokens (one chunk)",
			func(t testing.TB) { clustertest.CheckOptimisticRead(t, acceptsStaleTokens(h), 1) },
		},
		{
			"accepts stale tokens (window)",
			func(t testing.TB) { clustertest.CheckOptimisticRead(t, acceptsStaleTokens(h), 3) },
		},
		{
			string(ignoresWord),
			func(t testing.TB) { clustertest.CheckPrepareAdmission(t, withCoreMutant(h, ignoresWord, false)) },
		},
		{
			string(ignoresUnsettled),
			func(t testing.TB) {
				clustertest.CheckDrainWaitsForUnsettled(t, withCoreMutant(h, ignoresUnsettled, false))
			},
		},
		{
			string(skipsRefresh),
			func(t testing.TB) {
				clustertest.CheckOtherNodesExceptionsSeen(t, withCoreMutant(h, skipsRefresh, true))
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := runChecker(t, tc.check)
			if r.Skipped() {
				t.Skip(r.skipped)
			}
			require.True(t, r.Failed(), "the checker passed the mutant")
			t.Logf("the checker failed the mutant: %s", r.summary())
		})
	}
}
