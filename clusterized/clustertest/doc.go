// Package clustertest is the multi-node checker of the clusterized store,
// as a suite any lock engine runs through Run: the same checks on the
// in-process engine and on the kernel DLM.
//
// What it checks, each as one sub-test:
//   - MultiNode (CheckMultiNode): three nodes, each with its own clustered
//     persistent store and COW engine over shared in-memory origin and COW
//     devices, do random concurrent origin writes, snapshot reads and
//     writes and flushes; every snapshot read is checked against a
//     reference model of the writes' logical times, and at the end every
//     survivor's exceptions against the disk's, no COW chunk handed out
//     twice, every committed exception on disk (but a dead node's unsynced
//     lazy commits). In the crash runs a node dies holding EX with an
//     exception in commit: its devices refuse every later I/O (a dead node
//     writes nothing: the fencing the DLM relies on, not a token), then the
//     cluster crashes it; the dead node must fail with lockc.ErrLost, and a
//     survivor must see the LVB invalid and reload (or, on an engine that
//     reports an invalidated LVB that never held a value as Unknown, and
//     when no counter was published before the crash, re-read the
//     metadata: Harness.UnwrittenInvalidIsUnknown).
//   - OptimisticRead, PrepareAdmission, DrainWaitsForUnsettled,
//     OtherNodesExceptionsSeen: each forces, with a hook, one race between
//     two nodes that the random workload meets only by chance.
//
// Promises and rules:
//   - The suite's correctness rests on the lockc contract every engine
//     gives (modes, grant order, the LVB and its Invalid state, Lost): never
//     on fencing tokens (lockc.Tokener), which the kernel DLM does not have.
//     The stores under test get their engine with tokens hidden, whatever
//     the engine offers, so a pass on any engine shows the store correct
//     without them.
//   - Every check asks Harness.NewCluster for its cluster and uses a
//     cluster id no other run uses, so an engine that keeps a released
//     resource's LVB for a while (the kernel DLM) cannot carry one run's
//     counter into another, and one cluster (of guests, say) can serve
//     every check.
//   - The stores, devices and reference model live in the test process;
//     only the locks go through the engine, which may be remote (a
//     lockagent client in front of guests' DLMs).
//   - Crash runs need a locktest.Crasher whose Crash returns once the node's
//     lockspaces are lost; they skip without one.
//   - Checks take a testing.TB and may call FailNow from the goroutine that
//     called them only, so a self-test can run one through a recorder.
//   - Harness.WrapCore and Harness.WrapEngineStore exist only for the
//     suite's self-test, which plants deliberate bugs and expects the checks
//     to fail; Harness.Inspector reaches what the clusterized package shows
//     only to its own tests, and a check that lacks it skips that assertion.
//
// The suite is imported only by tests: package clusterized does not depend
// on it.
package clustertest
