// Package etcd is a lockc engine on etcd (specs/locks.md §4 and §7): nodes
// that reach one etcd cluster share DLM-style locks, with the DLM's modes,
// grant order, conversions, LVB and blocking notifications, and fencing
// tokens. It passes the conformance suite of package lockc/locktest against
// an embedded server, and a cluster of three processes of the etcd binary
// Debian ships whose leader is killed mid-run.
//
// Keys. Each lockspace lives under Options.Prefix + its name. Each lock is
// one key, attached to its membership's lease, holding its granted and
// requested modes; a resource's LVB is a key of its own that no lease holds,
// so it outlives its holders; a PW or EX holder also keeps a writer marker
// that no lease holds. The layout is in keys.go.
//
// Decisions. A node decides its own requests: it reads the resource's keys
// (a view at revision R), applies the DLM's rules (view.go), and commits the
// grant or the queueing in a transaction that holds only if no key of the
// resource changed after R. Two nodes deciding on the same view cannot both
// commit, so no incompatible grants are ever made. A lock whose lease is
// gone since R only makes a view more cautious. Queues are ordered by
// revisions: a new request by its key's creation, a conversion by the
// write that queued it. Only the requester ever writes its lock's key, so a
// cancelled request races nothing remote: giving up deletes the key (or
// puts the old mode back) without publishing. Releases (down-conversions,
// unlocks) need no view: one transaction, held to the key's last revision,
// writes the key, publishes the LVB from PW or EX and drops the writer
// marker. An unlock that leaves no lock on the resource forgets it: its
// keys go, and the next lock reads an Unknown LVB.
//
// Dead writers. A writer marker whose lock key is gone means its holder's
// lease expired while it held PW or EX. The next grant on the resource
// deletes the marker and marks the LVB invalid in the same transaction, so
// nobody trusts a dead writer's LVB, and no clock is compared.
//
// Lost answers. A request whose answer is lost (a member stops, a timeout)
// may have committed. Every change writes a sequence number into the lock's
// key; the next round reads the key and acts on what it says, so a grant
// that committed unseen is taken as granted, and a later change never
// undoes it blindly (releases are held to the key's revision). A lost
// request can also be applied after its operation moved on (gave up, or
// decided otherwise): the watch finds such a change of one of this
// membership's keys and undoes it without publishing (deletes the key of a
// lock the node no longer has, puts back what a lock holds), at once, or
// when the operation that was running on the lock ends.
//
// Watch. One prefix watch per membership (with WithRequireLeader, so a
// member cut off from its leader ends it) wakes this node's waiting
// requests when their resource changes, and sends a held lock a blocking
// notification for every request queued after its last grant whose mode
// its own blocks (a grant or a down-conversion also looks at the queues it
// saw). When the watch loses events (compaction) every waiting request reads
// again and every held lock re-reads its queues.
//
// Liveness and self-fencing. Each Open takes a lease of Options.TTL and
// renews it every TTL/3. etcd expires a lease TTL after it received the last
// renewal, and it received it after the node sent it, so the lease cannot
// expire before send time + TTL of the last acknowledged renewal. The node
// declares itself lost Options.Margin before that: OnLost functions run,
// then IsLost turns true, then Lost closes; every request of the
// membership stops. Another node can be granted a lost node's locks only
// once etcd has expired its lease, which is after the loss. IsLost also
// turns true by itself once the deadline passes, for a process resumed
// after a pause, before the goroutine that declares the loss has run.
// What the margin must cover is the time the node takes to stop the I/O it
// has started; storage that checks tokens (lockc.Tokener: each grant's etcd
// revision) closes that gap entirely.
//
// Connecting. Options.TLS secures the connections (the server's CA, the
// node's client certificate); the tests run against a member that requires
// client certificates. Open waits at most Options.DialTimeout for etcd to
// answer, and when no connection was ready its error carries the reason
// gRPC gave (a certificate the client does not trust, a refused handshake,
// a refused connection), which the etcd client would otherwise drop.
//
// Node ids. Each Open takes the next id of the lockspace from a counter in
// etcd: a restarted node is a new member with a new id.
//
// Locking. A membership's state and its locks' state are guarded by one
// mutex, never held across a request to etcd; OnLost functions run under it
// and must not call into the lockspace.
package etcd
