// Package persistent is clustersnap's dm-snapshot compatible exception store:
// a COW device it writes activates in the kernel as "snapshot <origin> <cow>
// P 0", and a COW the kernel wrote opens here. The layout, the allocation
// rule, the commit ordering and the merge primitives are those of the
// kernel's drivers/md/dm-snap-persistent.c, as described in
// shared/specs/dm-snapshot-format.md.
//
// # Layout
//
// Chunk 0 holds the header (spec §1.1). Metadata area k sits at chunk
// 1+k*(E+1), E = chunk bytes/16, and lists the E exceptions whose data
// chunks follow it (§1.2); a record whose COW chunk is zero ends the list
// (§1.3). Exceptions are allocated in increasing COW chunk order, skipping
// metadata (§1.4). The store refuses metadata that points outside the COW or
// at metadata, and an allocation that would fill the last area when its
// successor lies past the end of the device (§1.5).
//
// # Label
//
// The header chunk may also hold clustersnap's label (exstore.Labeler):
// the COW's UUID, the cluster serving it and the origin it belongs to. It
// starts right after the kernel's 16 header bytes and ends inside the
// first sector; all integers are little-endian:
//
//	offset  size  field
//	    16     4  magic 0x424C5343 (bytes "CSLB")
//	    20     2  version, 1
//	    22     2  merge state: 0 none, 1 merging, 2 merged
//	    24    16  UUID of the COW (random, version 4)
//	    40     8  origin size in bytes (0: no origin recorded)
//	    48     2  cluster id length, at most 64
//	    50     2  origin id length, at most 256
//	    52    64  cluster id (UTF-8), zero after its length
//	   116   256  origin id (UTF-8, such as "serial=..."), zero after its length
//	   372     4  CRC-32C (Castagnoli) of bytes 16..371
//
// Bytes 16..375 all zero mean "no label"; any other content that is not a
// version 1 record with a good checksum and canonical fields is refused
// with the reason, never taken for "no label". The merge state says the
// COW's snapshot is merging (1) into the origin the record names, or was
// merged (2) into it, and then the record must name one (size or id not
// zero); a merging COW is served only as that merge, a merged one not at
// all (package volumes). Bytes 22..23 were reserved as zero before the
// merge state took them, so an older reader refuses a merging or merged
// COW rather than serve its stale view. The kernel never reads
// these bytes: it loads a labelled COW as any other, and rewrites the
// header of an invalidated store from the buffer it loaded, label
// included; only a new store (magic 0) gets a header chunk written from a
// zeroed buffer, which leaves the COW unlabelled. SetLabel writes the
// label's sector with FUA, with the kernel's fields as just read, and no
// other chunk; this store's own header writes (invalidation) keep the
// label. Loading and Check accept a labelled COW; a label that cannot be
// used is logged by Open and is an error of Check.
//
// # Ordering
//
//   - A record is written only after the data it points to is durable: every
//     metadata write is preceded by a flush of the COW device (§2.1).
//   - A metadata area is written with FUA, and Commit returns only once its
//     record is durable; the header's valid flag is written the same way.
//   - The area after a full area is zeroed before the full area is written,
//     so a loader always finds a terminator.
//   - Records are written in allocation order, in batches (group commit): a
//     batch takes the prefix of prepared exceptions that are committed or
//     aborted, so a crash never leaves a record after a chunk that a later
//     allocation could reuse.
//   - Only the aligned blocks of an area that change are written; the result
//     on disk is byte-for-byte the kernel's.
//
// CommitLazy (exstore.LazyCommitter) makes an exception visible at once
// and leaves its record to the next batch, which Sync, a Commit or enough
// waiting exceptions start, with the same ordering.
//
// # Locking
//
// Locks, in the order they are taken: metaMu serialises metadata I/O (the
// committer's batches, Refresh, merge, invalidation); allocMu guards
// allocation, the queue of prepared exceptions and the area position; mu
// guards the table's contents. Lookups never wait for metadata I/O, and a
// lookup the table's filter rules out takes no lock at all. Validity and
// the table pointer are atomics.
//
// # Refresh
//
// Refresh re-reads the header and the metadata another writer changed; a
// header whose valid flag is 0 makes the store invalid. When the last
// record this store knows is still in place, the metadata only grew and the
// new records are added to the live table; otherwise the whole table is
// rebuilt and replaced at once, so a lookup sees either the old table or
// the new one. Refresh refuses to run while exceptions are being committed.
package persistent
