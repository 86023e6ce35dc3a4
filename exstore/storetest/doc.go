// Package storetest is the conformance suite every exstore.Store type runs.
//
// A store package describes how to make its stores in a Harness and calls
// Run from its tests. The suite checks the Store contract documented in
// package exstore: unique in-device allocation up to exactly the store's
// capacity and then ErrNoSpace, commit visibility, in-order commits and
// aborts, reloading, usage accounting, invalidation, the merge primitives
// with the kernel's run counting, refreshing a second instance, concurrent
// use (run it under -race), and the optional ConditionalPreparer and
// LazyCommitter capabilities when the store has them.
//
// The suite knows no store's layout. The harness supplies everything
// store-specific: how to make, reopen and share a store (New, Reopen,
// OpenShared; the last two may be nil, and the sub-tests that need them
// skip), how many exceptions a COW holds (Capacity), which chunks are
// metadata (IsMetadata), the usage after n exceptions (WantUsage), whether
// the store merges (Merge), and how many exceptions one unit of its
// metadata records (Span). From Span and IsMetadata the suite sizes COWs
// whose end falls at the edges of a metadata unit, and commits enough to
// cross units; a harness without Span gets sizes of the suite's own.
//
// Each sub-test of Run lives in its own file; session.go holds the helpers
// they share. The suite tests itself against a model store and its
// mutants (model_test.go): every sub-test must be able to fail.
package storetest
