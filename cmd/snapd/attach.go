package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/clustersnap/clustersnap/nbd"
)

// handshakeTimeout bounds attach's handshake with the server.
const handshakeTimeout = time.Minute

func runAttach(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	flags := newFlags("attach", "(--connect HOST:PORT | --socket PATH) --export NAME [--block-size 4096] [--timeout SECONDS] DEVICE", stderr)
	connect := flags.String("connect", "", "TCP address of the NBD server, e.g. 127.0.0.1:10809")
	socket := flags.String("socket", "", "unix socket of the NBD server")
	export := flags.String("export", "", "export to attach (origin, or a snapshot's name)")
	blockSize := flags.Uint("block-size", 4096, "block size the kernel uses for the device: 512, 1024, 2048 or 4096")
	timeout := flags.Int("timeout", 0, "seconds before the kernel fails a request the server does not answer (0: never)")
	if err := parse(flags, args); err != nil {
		return err
	}
	if flags.NArg() != 1 {
		return usagef("name one device, e.g. /dev/nbd0")
	}
	if (*connect == "") == (*socket == "") {
		return usagef("give exactly one of --connect and --socket")
	}
	if *export == "" {
		return usagef("--export is required")
	}
	if bs := *blockSize; bs < 512 || bs > 4096 || bs&(bs-1) != 0 {
		return usagef("--block-size %d: want 512, 1024, 2048 or 4096", bs)
	}
	if *timeout < 0 {
		return usagef("--timeout %d: want 0 or more seconds", *timeout)
	}
	dev, err := nbd.OpenKernelDevice(flags.Arg(0))
	if err != nil {
		return err
	}
	defer dev.Close()
	if dev.Started() {
		return fmt.Errorf("%s is attached already (snapd detach %s)", dev.Path(), dev.Path())
	}
	network, addr := "tcp", *connect
	if *socket != "" {
		network, addr = "unix", *socket
	}
	conn, err := (&net.Dialer{}).DialContext(ctx, network, addr)
	if err != nil {
		return fmt.Errorf("connect to %s: %w", addr, err)
	}
	defer conn.Close()
	hctx, cancel := context.WithTimeout(ctx, handshakeTimeout)
	info, err := nbd.Negotiate(hctx, conn, *export)
	cancel()
	if err != nil {
		return fmt.Errorf("export %q of %s: %w", *export, addr, err)
	}
	if err := info.CheckBlockSize(uint32(*blockSize)); err != nil {
		return fmt.Errorf("export %q of %s: %w (--block-size)", *export, addr, err)
	}
	ready := func() {
		mode := "read-write"
		if info.ReadOnly() {
			mode = "read-only"
		}
		fmt.Fprintf(stdout, "attached export %q of %s to %s (%d bytes, %s); detach with snapd detach %s or Ctrl-C\n",
			*export, addr, dev.Path(), info.Size, mode, dev.Path())
	}
	err = dev.Attach(ctx, conn, info, nbd.AttachOptions{
		BlockSize: uint32(*blockSize),
		Timeout:   time.Duration(*timeout) * time.Second,
		Ready:     ready,
	})
	if err != nil {
		return fmt.Errorf("export %q of %s: %w", *export, addr, err)
	}
	fmt.Fprintf(stdout, "%s detached\n", dev.Path())
	return nil
}

func runDetach(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	flags := newFlags("detach", "DEVICE", stderr)
	if err := parse(flags, args); err != nil {
		return err
	}
	if flags.NArg() != 1 {
		return usagef("name one device, e.g. /dev/nbd0")
	}
	dev, err := nbd.OpenKernelDevice(flags.Arg(0))
	if err != nil {
		return err
	}
	defer dev.Close()
	if !dev.Started() {
		return fmt.Errorf("%s is not attached", dev.Path())
	}
	if err := dev.Detach(); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "%s detached\n", dev.Path())
	return nil
}
