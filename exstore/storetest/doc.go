// Package storetest is the conformance suite every exstore.Store type runs.
//
// A store package describes how to make its stores in a Harness and calls Run
// from its tests. The suite checks the Store contract documented in
// package exstore: unique in-device allocation up to exactly the store's
// capacity and then ErrNoSpace, commit visibility, in-order commits and
// aborts, reloading, usage accounting, invalidation, the merge primitives
// with the kernel's run counting, refreshing a second instance, and
// concurrent use (run it under -race).
//
// COW sizes are chosen around dm-snapshot's persistent layout (a metadata
// area every 1+chunkSectors*32 chunks after the header) so that they hit that
// layout's edge cases; stores without metadata just see varied sizes.
package storetest
