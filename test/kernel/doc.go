// Package kernel holds the tests that check clustersnap's persistent COW
// format against the real Linux dm-snapshot target, both ways: a COW the
// kernel wrote opens in package persistent with the same exceptions and
// usage figures, and a COW package persistent wrote activates in the kernel
// ("snapshot <origin> <cow> P 0") with the same snapshot view, and the kernel
// can go on adding exceptions to it, leaving the COW's label (written
// after the kernel's header fields) as it was. TestDMSnapshotMerge checks merge the
// same way: a COW the kernel wrote and a COW our COW engine wrote are each
// merged by the kernel's snapshot-merge target and by cow.Origin.Merge, and
// the merged origins and COWs must be identical byte for byte. The kernel
// runs in a QEMU guest (package test/guest); see test/README.md.
package kernel
