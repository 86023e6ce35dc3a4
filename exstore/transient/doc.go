// Package transient is the transient ("N") exception store: the kernel's
// dm-snap-transient. It keeps its exceptions only in memory and writes
// nothing but chunk data to the COW device, which holds data chunks from
// chunk 0 upwards with no header and no metadata, so the COW contents mean
// nothing once the store is closed.
//
// The store keeps the exstore.Store contract with one lock (Store.mu) over
// its table, allocation and queue: chunks are handed out from 0 upwards, and
// exceptions complete strictly in chunk order, which is the in-order commit
// rule. Commit makes an exception visible and does no I/O; Invalidate
// writes nothing; Refresh does nothing; merge is refused, as in the kernel.
package transient
