// Package dlmtest runs lockc's conformance suite (package lockc/locktest),
// and any multi-node test, on the kernel DLM of ONE kernel: node id N is an
// Engine of its own (package lockc/dlm) with NodeID N, whose lockspace
// files are separate lock owners to the kernel, as separate machines'
// would be. It is a test tool.
//
// NewCluster skips its test unless the environment variable
// CLUSTERSNAP_DLM_KERNEL is 1 (the guest harness of test/dlm sets it in the
// guest). The first cluster of a process starts the solo controller
// (package lockc/dlm/solo) for node 1, unless configfs already has a local
// node (a real controller, or a solo controller started by the test
// binary); the controller then runs until the process exits.
//
// A Cluster is a locktest.Cluster, a locktest.Crasher (Crash marks the
// node's lockspaces lost and closes their files without unlocking: the
// kernel force-unlocks, as for a process that dies) and a
// locktest.QueueWaiter (it reads the resource's queues from debugfs,
// /sys/kernel/debug/dlm/<lockspace>_all, and then passes a request through
// every node's file of the lockspace, so that the blocking notifications
// the queuing caused have been read). It is no locktest.ResourceCounter:
// the kernel keeps unlocked resources for a while and the engine holds a
// probe resource per file, so a count would not mean what the suite asks.
//
// The cluster holds each lockspace it has seen open through an anchor
// Engine of its own until cleanup: the kernel frees a lockspace when its
// last creator leaves, and a join that races that free attaches to the
// dying lockspace. Nodes that close and rejoin as the suite's do would hit
// that race without the anchor.
package dlmtest
