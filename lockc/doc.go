// Package lockc is clustersnap's lock client: DLM-style locks on named
// resources inside lockspaces, with the Linux DLM's six modes, grant order,
// conversions, a 32-byte lock value block (LVB), blocking notifications and
// node-failure signalling.
//
// The API is engine-neutral. An Engine opens lockspaces for one node; the
// in-process engine (package lockc/inproc) is the embedded default for one
// host and can also simulate several nodes and their crashes in one process.
// Network engines (etcd, the kernel DLM) implement the same interfaces and
// must pass the same conformance suite (package lockc/locktest).
//
// Semantics follow the DLM (see specs/locks.md §1): a request is granted only
// when compatible with every granted lock and every pending conversion;
// conversions are granted before new requests; new requests are granted in
// arrival order. Every lock carries the LVB (the DLM's VALBLK is always set):
// it is read into the lock on a new grant and on every up-conversion, and
// written from the lock when it leaves PW or EX (down-conversion, same-mode
// PW/EX conversion, or unlock).
package lockc
