// Package dlm proves package lockc/dlm on a real kernel DLM: one QEMU guest
// (package test/guest) with Debian's kernel, the configfs and dlm modules,
// configfs and debugfs mounted, runs the test binaries of lockc/dlm (and
// of any package listed in guestSuites) with CLUSTERSNAP_DLM_KERNEL=1.
// The lockc conformance suite, the engine's own guest tests and the lock
// benchmarks of lockc/dlm and lockc/inproc run there; the host test fails
// unless each binary exits 0 and the suites really ran (a suite that
// skipped fails it). The guest's controller is lockc/dlm/solo (one node);
// nothing leaves the guest. See test/README.md for the packages the guest
// tests need.
package dlm
