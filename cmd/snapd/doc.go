// Command snapd creates, inspects and serves dm-snapshot compatible
// copy-on-write snapshots over NBD, and attaches NBD exports to the
// kernel's nbd devices. It parses flags, calls the packages that do the
// work (volumes for serving, persistent for the COW format, exstore/cow
// for the demo's engine, nbd for the protocol and the kernel device) and
// prints what they did; one file per command.
//
// Exit codes: 0 success, 1 the operation failed (I/O, corrupt metadata,
// invalid snapshot), 2 bad usage (unknown command or flag, bad value).
package main
