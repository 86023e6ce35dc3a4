// Package solo is a test tool: a cluster controller for a single kernel,
// standing in for corosync and dlm_controld where a test needs the kernel
// DLM and has one machine (a QEMU guest) to itself. Never run it beside a
// real controller, nor on a machine whose lockspaces matter.
//
// Start configures configfs for one local node (the cluster directory, a
// comms entry with the node id, a loopback address and local=1) and then
// answers the kernel's lockspace uevents, received over
// NETLINK_KOBJECT_UEVENT: a join ("online") gets the lockspace's global id,
// this node as its only member, control=1 and event_done=0; a leave
// ("offline") gets event_done=0 and its configfs directory removed. Events
// are handled one at a time, in the order the kernel sends them.
//
// StopLockspace and ResumeLockspace write the lockspace's control file (0 and 1), as a real
// controller does around recovery: while stopped, the kernel blocks every
// request in the lockspace. Tests use them to make a liveness probe stall.
//
// What it does not do: membership of several nodes, quorum, fencing,
// recovery of anything but the one node. One Controller per kernel; Close
// stops answering (lockspaces joined later block in the kernel until
// someone answers).
package solo
