// Package nbdkernel tests the NBD server (package nbd) against the Linux
// kernel's NBD client: nbd-client 3.24 in a QEMU guest (package test/guest)
// lists the server's exports and attaches one as /dev/nbd0, with one
// connection and with four (CAN_MULTI_CONN), and the guest makes and checks
// an ext4 file system on it. It also tests snapd's own client, snapd attach
// and snapd detach (built static and run in the guest), against the same
// server: its errors, the device it makes, the data read and written
// through it, and detaching. The server runs in the test process; guest
// connections reach it through QEMU's user-mode network. The host then
// checks the served image, the connections the server accepted and the
// flushes the kernel sent. See test/README.md.
package nbdkernel
