// Package cluster tests snapd as a member of a real cluster: several QEMU
// guests, each running Debian's kernel with corosync, dlm_controld and
// snapd serve --lock dlm over the same origin and COW images (shared
// virtio disks), driven over NBD from the host by clients nobody here
// wrote. It has only tests; see test/guest for the guests and their
// guest-only network.
package cluster
