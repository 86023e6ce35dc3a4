// Package etcd is a lockc engine on etcd (specs/locks.md §4 and §7): nodes
// that reach one etcd cluster share DLM-style locks, with the DLM's modes,
// grant order, conversions, LVB and blocking notifications, and fencing
// tokens (the etcd revision of each grant).
package etcd
