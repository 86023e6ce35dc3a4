// Package dlmcluster runs lockc engines on the Linux kernel DLM across
// several kernels: QEMU guests (Debian's kernel, TCG) that form a cluster
// with corosync 3 and dlm_controld 4 (package test/guest's DLMCluster), each
// with an agent (cmd agent in this directory) that serves lockc/dlm engines
// to the host's test over one lockagent connection.
//
// Remote (Start) is the reusable part: the booted cluster, the agents'
// clients, Kill and Reboot of a guest, the hub that can cut one off, and
// LockCluster, a lockc cluster whose node ids map onto the guests in turn
// (with three guests, node 4 is a second lock owner on guest 1). A
// LockCluster is a locktest.Cluster, a locktest.Crasher (a process-level
// crash of the node's engine: its device files close without unlocking) and
// a locktest.QueueWaiter: queue lengths come from debugfs on the guest that
// masters the resource (polled: the kernel gives no notification of a
// request reaching its queue), and the blocking notifications they caused
// are made to arrive before it returns: every other guest passes a request
// through the master, whose answer follows the master's earlier
// notifications to that guest on their connection, then every guest passes
// a request through each of its lockspace files.
//
// Guests reach the host only through QEMU's restricted user-mode network
// (the agents dial the test's loopback listener through a forwarded
// address); the cluster's own traffic stays between the guests on the hub.
//
// The agents' engines run with DefaultStallBound. Without fencing the
// cluster only approximates production: a partitioned node's loss (the
// stall bound) and the majority's grant of its locks are not ordered.
package dlmcluster
