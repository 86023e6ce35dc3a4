// Package snapset keeps the snapshot set of a clustered origin: every node
// that writes the origin must copy into the same snapshots, since a node
// serving the origin with one snapshot fewer would overwrite chunks
// without copying them. The set lives in the value block (LVB) of one
// origin-level lock (package lockc) that every node serving the origin
// holds; the layout is in lvb.go: a magic, a version, the number of
// snapshots, a generation and a digest of the COW identities (Set).
//
// # Joining
//
// Join takes the origin resource in NL (so the LVB is kept while the node
// serves), then PR, queued behind any change under way. A published set
// must be the node's own (same count and digest; the generation does not
// matter): otherwise Join fails with a *MismatchError, which wraps
// ErrSetMismatch and names this node's snapshots and the cluster's count,
// generation and digest, and the node holds nothing. When no set is
// published (the first node; every node left; a node died in EX while it
// changed the set, which leaves the LVB invalid), Join publishes the
// node's own under EX as the generation after the highest it has seen,
// unless another node published meanwhile, and comes back to PR. It goes
// from PR to EX through NL, so two nodes doing so at once cannot deadlock
// their conversions. A value block of another magic or version is refused
// (ErrForeignValue), never overwritten.
//
// # Origin writes
//
// Member.Enter admits an origin change (write, trim, zeroes, merge run)
// while the node holds PR with its set current; the change calls leave
// when it is done. The open gate costs two atomic loads and two atomic
// adds per change. A node that wants EX makes every member give way: on
// the blocking notification, a member closes its gate (newcomers wait),
// waits for the changes inside to leave, converts to NL and back to PR,
// queued behind the EX holder, and reads the set again. The same set
// reopens the gate. Another set stops the member: Enter fails with
// ErrSetChanged, and the lock stays in NL so that it keeps no later change
// waiting; unless the member follows (JoinFollowing): then its Follower
// makes the drained writes durable before the member lets go of PR
// (Quiesced), and when the member reads another set it adopts it (Adopt,
// with the gate still closed): the gate reopens if the node now serves the
// published set, and the member stops otherwise. A value that publishes
// the member's own set as a later generation (a change that kept the set
// but changed what its snapshots hold, such as a merge step) is passed to
// Adopt too. Update's callback and Adopt get a context under which Enter
// admits at once: they run while no other origin change runs anywhere. A value missing or invalid (the changer died in EX) is
// published again from this member's set. So no origin change of any node
// is inside a gate while another node holds EX, and none is admitted
// under a set other than the one the cluster published.
//
// Once the node loses the lockspace, Enter fails with an error wrapping
// lockc.ErrLost (the lockspace's OnLost marks it, before another node can
// be granted the lock); changes admitted before the loss are the caller's
// to fence at the device. After Close, Enter fails with ErrClosed.
//
// # Changing the set
//
// Member.Update publishes a new set as the next generation: it drains its
// own gate, converts to EX through NL, checks that the cluster still
// publishes the value it last read (another change first fails it with
// ErrSetChanged), has the caller compute the next set from the one it
// serves and take it on while no node writes the origin, publishes it, and
// comes back to PR (Change is Update with the next set given). Members
// whose set is not the new one stop as above, or adopt it if they follow
// (JoinFollowing); publishing the same set again makes the followers
// catch up with what its snapshots hold (a merge step).
//
// # Locking
//
// One goroutine per member (started by Join, ended by Close) answers
// blocking notifications. The lock runs one operation at a time: the
// manager (and a follower's Adopt, which it runs), Update and Close take
// turns under Member.opMu. Admissions on
// the slow path and the closing of the gate are ordered by Member.mu; the
// fast path is ordered with a drain by sequentially consistent atomics (a
// change counts itself, then re-reads the state; a drain closes the state,
// then counts).
package snapset
