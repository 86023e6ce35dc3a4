package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"

	"github.com/pojntfx/go-nbd/pkg/client"
)

// openNBDDevice opens /dev/nbdN, explaining the usual reason it is missing.
func openNBDDevice(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%s: no such device: load the kernel's nbd module (modprobe nbd), or use nbd-client", path)
	}
	if err != nil {
		return nil, err
	}
	return f, nil
}

func runAttach(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	flags := newFlags("attach", "(--connect HOST:PORT | --socket PATH) --export NAME [--block-size 4096] [--timeout SECONDS] DEVICE", stderr)
	connect := flags.String("connect", "", "TCP address of the NBD server, e.g. 127.0.0.1:10809")
	socket := flags.String("socket", "", "unix socket of the NBD server")
	export := flags.String("export", "", "export to attach (origin, or a snapshot's name)")
	blockSize := flags.Uint("block-size", 4096, "block size the kernel uses for the device")
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
	devPath := flags.Arg(0)
	dev, err := openNBDDevice(devPath)
	if err != nil {
		return err
	}
	defer dev.Close()
	network, addr := "tcp", *connect
	if *socket != "" {
		network, addr = "unix", *socket
	}
	conn, err := (&net.Dialer{}).DialContext(ctx, network, addr)
	if err != nil {
		return fmt.Errorf("connect to %s: %w", addr, err)
	}
	defer conn.Close()

	// Connect hands the socket to the kernel and returns only when the
	// device is disconnected (detach, or the server went away).
	done := make(chan error, 1)
	go func() {
		done <- client.Connect(conn, dev, &client.Options{
			ExportName: *export,
			BlockSize:  uint32(*blockSize),
			Timeout:    *timeout,
			OnConnected: func() {
				fmt.Fprintf(stdout, "attached export %q of %s to %s; detach with snapd detach %s or Ctrl-C\n", *export, addr, devPath, devPath)
			},
		})
	}()
	select {
	case err := <-done:
		if err != nil {
			return fmt.Errorf("attach %s to %s: %w", *export, devPath, err)
		}
		fmt.Fprintf(stdout, "%s detached\n", devPath)
		return nil
	case <-ctx.Done():
		if err := client.Disconnect(dev); err != nil {
			return fmt.Errorf("detach %s: %w", devPath, err)
		}
		<-done
		fmt.Fprintf(stdout, "%s detached\n", devPath)
		return nil
	}
}

func runDetach(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	flags := newFlags("detach", "DEVICE", stderr)
	if err := parse(flags, args); err != nil {
		return err
	}
	if flags.NArg() != 1 {
		return usagef("name one device, e.g. /dev/nbd0")
	}
	dev, err := openNBDDevice(flags.Arg(0))
	if err != nil {
		return err
	}
	defer dev.Close()
	if err := client.Disconnect(dev); err != nil {
		return fmt.Errorf("detach %s: %w", flags.Arg(0), err)
	}
	fmt.Fprintf(stdout, "%s detached\n", flags.Arg(0))
	return nil
}
