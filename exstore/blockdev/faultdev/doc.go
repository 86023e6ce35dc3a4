// Package faultdev is an in-memory blockdev.Device for crash and failure
// tests.
//
// The volatile cache model: the disk caches writes at 512-byte sector
// granularity (SectorSize). Every sector written or discarded since it was
// last made durable keeps the ordered list of versions written to it; reads
// return the newest. Sync makes every such sector durable with its newest
// content; WriteAtSync (FUA) makes durable the sectors it touches (with
// their newest content, which for a partial sector includes earlier
// unsynced writes to the rest of it) and leaves other sectors pending.
// These two are the only ways to make content survive every power cut.
// WriteAtSync first puts its data in the cache as pending versions, then
// makes them durable; a power cut between the two (the fault function may
// hold or fail the FUA step) keeps any subset of its sectors, since a disk
// promises atomicity per sector only.
//
// Power cuts: PowerCut returns a new device in which every pending sector
// independently holds its durable content or any one of its pending
// versions, chosen with the caller's rng in sector order, so a seeded rng
// reproduces an outcome. This covers a cache that dropped, kept, tore (at
// sector granularity) or reordered writes, or wrote an older version back.
// PowerCutDropAll and PowerCutKeepAll give the two extreme outcomes. The old
// device is dead: every operation on it fails with ErrPowerCut, so
// goroutines still using it cannot leak writes into the surviving image,
// and its frozen content can be cut again for another possible outcome.
//
// Fault injection: SetFault installs a FaultFunc asked before every read,
// write, sync and discard, and before the FUA step of a WriteAtSync; a non-nil error fails the operation. It is
// called without the device's lock held, so it may block (holding an
// operation in flight while a test cuts power) or call the device.
//
// A Device's methods are safe for concurrent use; Stats counts the
// operations that succeeded.
package faultdev
