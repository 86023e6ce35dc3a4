// Package exstore is the exception-store framework of clustersnap.
//
// An exception store records, for one snapshot, which origin chunks have
// been copied to the snapshot's COW device and where: an exception maps an
// origin chunk (Old) to a COW chunk (New). The model is the Linux kernel's
// dm-exception-store.
//
// # The Store contract
//
// Every Store method is safe for concurrent use. A store loads its metadata
// when opened, looks chunks up, prepares (allocates) exceptions, commits
// them, reports its usage as dm-snapshot does, can be invalidated, offers
// the two primitives snapshot merge is built from (PrepareMerge,
// CommitMerge), and re-reads metadata another node changed (Refresh).
// Ordering rules every store keeps:
//
//   - Prepare hands out COW chunks in increasing order, and a Commit
//     returns only once every exception prepared before it is committed or
//     aborted, so a crash never leaves a committed exception whose chunk a
//     later allocation could hand out again.
//   - An exception is visible to Lookup from its Commit on, never before.
//   - A store with metadata flushes the COW device before writing metadata
//     that points at it, and Commit returns once the metadata is durable.
//   - Once invalid, a store fails every Prepare and Commit with an error
//     wrapping ErrInvalid; Err returns an *InvalidError that says why.
//
// # Optional capabilities
//
// A store may do more through interfaces in capability.go, which the COW
// engine and wrappers look for and do without when a store lacks them:
// RangeLookuper (a run of chunks in one call), AbsenceChecker (a run of
// chunks without exceptions told without a lock), OptimisticLookuper
// (answers checked after the I/O instead of held, for stores shared with
// other nodes), LazyCommitter (exceptions visible at once, durable at the
// next Sync), ConditionalPreparer (allocation conditional on a caller's
// word, with a count of the prepared exceptions not yet settled) and
// Labeler (a Label on the COW device: its UUID, the cluster serving it and
// the origin it belongs to).
//
// # Table and Registry
//
// Table is the in-memory index of exceptions the stores share; the store
// that owns one guards it (see Table for which methods may run together).
// Registry maps store type names to the functions that open them; store
// types live in their own packages (persistent, transient, clusterized) and
// register into a Registry the program builds.
package exstore
