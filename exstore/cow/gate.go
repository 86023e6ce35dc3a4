package cow

import "context"

// OriginGate admits the changes of the origin device: writes, trims,
// zeroes and merge runs. A clustered origin passes every change through
// the gate of the cluster's snapshot set (package clusterized/snapset), so
// that no node changes the origin while its set of snapshots is not the
// cluster's: a node with a snapshot fewer would overwrite chunks without
// copying them into it.
//
// The contract, where it is used:
//   - A change enters before its first copy, so that the copies it makes
//     are into the set the gate admitted it under, and leaves after its
//     last write (and its sync, with FUA) to the origin.
//   - It enters before it takes the origin's snapshot list (Origin.snapMu):
//     a gate closed while its set changes may make a change wait, and the
//     change of the set may need AddSnapshot, which takes the list
//     exclusively.
//   - An origin change never enters twice: a gate drain waits for the
//     changes inside, and a nested Enter could wait for that drain.
//   - Reads, flushes and snapshot writes do not enter: they never change
//     the origin.
//
// A nil gate (the default, one node) costs a nil check.
type OriginGate interface {
	// Enter blocks until the caller may change the origin, or fails
	// (the change must then not happen); leave ends the change.
	Enter(ctx context.Context) (leave func(), err error)
}

// SetGate makes every later origin change pass g; nil removes the gate.
// Call it before the origin is served: it is not synchronized with
// changes in flight.
func (o *Origin) SetGate(g OriginGate) { o.gate = g }

// enter passes the origin's gate, if it has one.
func (o *Origin) enter(ctx context.Context) (leave func(), err error) {
	if o.gate == nil {
		return noLeave, nil
	}
	return o.gate.Enter(ctx)
}

func noLeave() {}
