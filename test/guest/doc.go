// Package guest boots the installed Debian kernel under QEMU (software
// emulation) with a busybox initramfs and runs a shell script in it, for the
// tests that need a real Linux kernel: dm-snapshot format interop, the kernel
// NBD client, the kernel's snapshot merge, DLM. See
// shared/specs/qemu-guests.md for why guests and how they behave on the
// project's machines.
//
// Build makes a base initramfs once (busybox, kernel modules with their
// dependencies, host programs with their shared libraries, and an /init);
// each Run adds a script, boots, and returns the script's output and exit
// status from the serial console. Setup and Boot wrap them for tests, with
// the skip-or-fail policy for machines without QEMU or a kernel.
package guest
