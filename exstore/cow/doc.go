// Package cow is clustersnap's copy-on-write engine: the I/O logic of the
// kernel's dm-snapshot (drivers/md/dm-snap.c) in userspace, over any
// exstore.Store.
//
// An Origin serves the origin device: reads pass straight through; before a
// write overwrites a chunk, every valid snapshot that has no exception for
// it gets a copy of its old content. A Snapshot serves the origin as it was
// when the snapshot was taken, plus the snapshot's own writes: chunks with
// an exception come from its COW device, the others from the origin.
// Origin.Merge rolls the origin back to a snapshot while it is served, and
// Snapshot.Extents tells which ranges of a snapshot its COW device holds.
// Both serve any byte range of the volume, across chunks; writes to a
// device whose Alignment is larger than 1 must be aligned to it
// (ErrUnaligned).
//
// # Copy before overwrite
//
// These orderings keep a snapshot right, also across a crash:
//   - An origin write reaches the origin only after every valid snapshot's
//     copy of the chunks it covers is committed: the store syncs the copy
//     before the record, and the record is durable when Commit returns.
//     The copies one write needs run in parallel, largest chunk size
//     first, so that their commits share metadata writes.
//   - An origin write never overwrites a chunk whose exception is not
//     durable: a lazily committed one is synced first.
//   - One snapshot's copy of one chunk is made once: the COW path holds the
//     chunk (chunkLocks, the kernel's pending-exception table) from its
//     lookup to its commit, and later writers find its exception.
//   - A partial snapshot write reaches the COW only after the copy of the
//     rest of its chunk is committed; a whole-chunk write goes straight to
//     the new COW chunk, and its exception is committed after it.
//
// # Lock-free snapshot reads
//
// Every change to the origin (write, trim, zeroing, merge run) announces
// the chunks it covers on the snapshots' stripes after their copies and
// before it touches the origin. A snapshot read takes no lock: it samples
// the announcements of its chunks before its lookups and again after its
// I/O, and reads again if one came, so a read that went to the origin
// never returns data written after the snapshot. After a few disturbed
// attempts it holds its chunks, under which no exception for them can
// appear. A read of several chunks reads each run of them that is
// contiguous on the origin or on the COW with one I/O. chunkLocks states
// the rules in full.
//
// # Durability
//
// A write with FUA is durable, data and exception, when it returns. Without
// FUA a snapshot write's exception is committed lazily where the store
// allows it (exstore.LazyCommitter), and becomes durable at the next Flush;
// an origin write's copies are always committed durably. Flush makes every
// write that completed before it durable: Snapshot.Flush syncs its COW (and
// its store's lazy commits) and the origin, Origin.Flush the origin and
// every valid snapshot's COW; each skips a device that no write reached
// since its last sync.
//
// # Invalidation
//
// An origin write never fails because of a snapshot. A snapshot whose copy
// cannot be made (COW full, an I/O error on the copy or the commit, a
// failed sync of a lazy exception or of its COW at Origin.Flush) is
// invalidated at once, durably in its store where it can be, and origin
// writes skip it from then on; its errors wrap exstore.ErrInvalid (and
// ErrCOWFull when the COW filled up). A snapshot write that cannot
// allocate invalidates its snapshot too, unless the snapshot is in
// overflow mode: then the write fails with ErrOverflow and the snapshot
// stays readable. An origin write fails only if its context ends, a
// store's lookup fails, a store fails in a way that is not invalidity (a
// clustered store that lost its lock: overwriting without the copy would
// corrupt the snapshot for the other nodes), or the origin I/O fails. A
// store that stops so in the middle of a write's copy fails that write and
// every later one, whatever its Prepare or Commit answered, and the
// snapshot is not marked invalid on this node.
//
// # Trims and zeroing
//
// They follow from the same rule, that the origin changes only after
// every snapshot has its copy. Origin.Trim is a hint: on a
// blockdev.Discarder it copies as a write does and discards the whole
// discard units of the range; elsewhere it changes nothing and copies
// nothing. Origin.WriteZeroes copies as a write does, then discards or
// writes zeroes. Snapshot.Trim never touches the origin nor allocates: it
// is checked as a write and does nothing. Snapshot.WriteZeroes is a write
// of zeroes.
//
// # Merge
//
// Origin.Merge rolls the origin back to a snapshot S while the origin is
// served, as the kernel's snapshot-merge target does; nobody need be
// connected (that is the offline merge). Origin.StartMerge (which Merge
// calls first) records the merge with S's MergeMarker (the COW's label,
// exstore.Merging) and then, once the origin changes in flight completed,
// switches the origin to merge mode: from then on the origin reads as S
// did. A chunk S still has an exception for reads from S's COW and takes
// writes and zeroes there, so that the merge carries them to the origin; a
// trim skips it. Any other chunk is the origin's as usual, the other
// valid snapshots copying before it changes; S never gets an exception
// again, and its own I/O fails (ErrMerging). Flush syncs S's COW too. A
// reopen that finds the mark resumes merge mode (package volumes does),
// so a merge survives a crash; merge mode ends only when the merge is
// complete, which is recorded too (exstore.Merged) before S is removed.
// Meanwhile no snapshot is added or removed. Origin.MergeStep merges a
// budget of runs at a time (a cluster runs each step while no other node
// changes the origin) and ends the merge as Merge does.
//
// Each merge run (the last run of consecutive exceptions, at most
// maxMergeIO of it) is, to the other snapshots, an origin write: they copy
// what it overwrites first, and it announces the chunks. It holds its
// chunks of S (chunkLocks) from before its COW read until its records are
// cleared, so that a write to one of them either reaches the COW before
// the run reads it or finds the exception gone and goes to the origin.
// The origin is flushed before the run's records are cleared, so a merge
// may be interrupted, and resumed, at any point. A merge whose records
// could not be cleared stops, and the writes to that run's chunks fail,
// until the store is reopened. In merge mode an origin write must also be
// aligned as S's COW needs (ErrUnaligned); outside it, the origin's reads
// and writes cost one atomic load more than they would without merges.
//
// # The origin's gate
//
// An origin given an OriginGate (gate.go) passes every change of the
// origin device through it (writes, trims, zeroes, merge runs), from
// before its copies to after its origin I/O: a clustered node writes the
// origin only while its set of snapshots is the cluster's. Without one
// (a single node) a change costs a nil check.
//
// # Snapshots and origin writes
//
// Origin writes hold the origin's snapshot list shared for their whole
// span, and AddSnapshot and RemoveSnapshot exclusively (and so do the
// switch into merge mode and its end), as the kernel suspends the origin
// to load a snapshot table: a write either copies into
// a new snapshot or completed before it existed. AddSnapshot is therefore
// a cut of a served origin: it also flushes the origin before the
// snapshot joins, so the snapshot holds every write acknowledged before
// the call, durably, none started after it returned, and a write in flight
// wholly or not at all. A removed snapshot gets no more copies and fails
// every use (ErrRemoved).
package cow
