package nbd

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// The kernel nbd driver's ioctls (linux/nbd.h) and block major number.
const (
	kernelSetSock       = 0xab00
	kernelSetBlockSize  = 0xab01
	kernelDoIt          = 0xab03
	kernelClearSock     = 0xab04
	kernelSetSizeBlocks = 0xab07
	kernelDisconnect    = 0xab08
	kernelSetTimeout    = 0xab09
	kernelSetFlags      = 0xab0a
	kernelMajor         = 43
)

// kernelReadyPoll is how often Attach looks whether the kernel has started
// the device (NBD_DO_IT blocks, and says nothing when the device is up).
const kernelReadyPoll = 5 * time.Millisecond

// KernelDevice is an open /dev/nbdN of the kernel's nbd driver. Attach hands
// it an NBD connection, as nbd-client does; Detach ends that from any
// process. One process attaches a device at a time: the kernel refuses a
// second socket with EBUSY.
type KernelDevice struct {
	f     *os.File
	path  string
	minor uint32
}

// OpenKernelDevice opens /dev/nbdN (the ioctls need no more than reading),
// checks that it is one of the nbd driver's devices, and explains the usual
// reasons it is missing.
func OpenKernelDevice(path string) (*KernelDevice, error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%s: no such device: %s", path, kernelDevicesHint())
	}
	if err != nil {
		return nil, err
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFBLK || unix.Major(st.Rdev) != kernelMajor {
		f.Close()
		return nil, fmt.Errorf("%s: not an nbd device (use /dev/nbdN: %s)", path, kernelDevicesHint())
	}
	return &KernelDevice{f: f, path: path, minor: unix.Minor(st.Rdev)}, nil
}

// kernelDevicesHint says which nbd devices there are, or how to get them.
func kernelDevicesHint() string {
	n, err := os.ReadFile("/sys/module/nbd/parameters/nbds_max")
	if err != nil {
		return "load the kernel's nbd module (modprobe nbd), or use nbd-client"
	}
	count, err := strconv.Atoi(strings.TrimSpace(string(n)))
	if err != nil || count <= 0 {
		return "the nbd module is loaded without devices (modprobe nbd nbds_max=N)"
	}
	return fmt.Sprintf("the nbd module is loaded with /dev/nbd0 to /dev/nbd%d", count-1)
}

// Path is the device's path, as opened.
func (d *KernelDevice) Path() string { return d.path }

// Close closes the device file; an attached device stays attached.
func (d *KernelDevice) Close() error { return d.f.Close() }

// Started reports whether the kernel runs the device: it adds the pid
// attribute when NBD_DO_IT has started it and removes it when it stops.
func (d *KernelDevice) Started() bool {
	_, err := os.Stat(fmt.Sprintf("/sys/dev/block/%d:%d/pid", kernelMajor, d.minor))
	return err == nil
}

// ioctl runs one of the nbd driver's ioctls on the device.
func (d *KernelDevice) ioctl(name string, req uint, arg int) error {
	if err := unix.IoctlSetInt(int(d.f.Fd()), req, arg); err != nil {
		return fmt.Errorf("%s: %s: %w", d.path, name, err)
	}
	return nil
}

// Detach writes the device's dirty pages back to the server (with a
// flush), then has the kernel disconnect from the server and drop the
// socket, which ends the Attach running on it. The device is detached even
// when the write-back fails, and the error says so.
func (d *KernelDevice) Detach() error {
	syncErr := d.f.Sync()
	if err := d.ioctl("NBD_DISCONNECT", kernelDisconnect, 0); err != nil {
		return err
	}
	if err := d.ioctl("NBD_CLEAR_SOCK", kernelClearSock, 0); err != nil {
		return err
	}
	if syncErr != nil {
		return fmt.Errorf("%s detached, but writing its cached data back failed: %w", d.path, syncErr)
	}
	return nil
}

// AttachOptions tune Attach.
type AttachOptions struct {
	// BlockSize is the device's logical block size: 512, 1024, 2048 or
	// 4096, within the export's constraints, dividing its size.
	BlockSize uint32
	// Timeout is how long the kernel waits for a reply before failing
	// the request; 0 waits for ever.
	Timeout time.Duration
	// Ready, if set, is called once the kernel has started the device.
	Ready func()
}

// Attach hands conn, on which Negotiate selected the export info describes,
// to the kernel, and serves the device until it is disconnected: by Detach
// (here or in another process), by the server going away, or by ctx ending,
// which detaches it. It returns nil when the device was detached cleanly.
// conn is closed: the kernel holds the socket from then on.
func (d *KernelDevice) Attach(ctx context.Context, conn net.Conn, info ExportInfo, opts AttachOptions) error {
	if err := info.CheckBlockSize(opts.BlockSize); err != nil {
		conn.Close()
		return err
	}
	sock, err := kernelSocket(conn)
	if err != nil {
		return err
	}
	defer sock.Close()
	if err := d.configure(sock, uint64(opts.BlockSize), info, int(opts.Timeout/time.Second)); err != nil {
		_ = d.ioctl("NBD_CLEAR_SOCK", kernelClearSock, 0)
		return err
	}

	done := make(chan error, 1)
	go func() { done <- d.run() }()
	tick := time.NewTicker(kernelReadyPoll)
	defer tick.Stop()
	for ready := false; ; {
		select {
		case err := <-done:
			// NBD_DO_IT returns once the device is disconnected: by
			// Detach, or because the server went away.
			if err == nil {
				err = d.ioctl("NBD_CLEAR_SOCK", kernelClearSock, 0)
			}
			return err
		case <-ctx.Done():
			err := d.Detach()
			<-done
			return err
		case <-tick.C:
			if ready || !d.Started() {
				continue
			}
			ready = true
			tick.Stop()
			if opts.Ready != nil {
				opts.Ready()
			}
		}
	}
}

// configure gives the kernel the export's geometry and flags, the request
// timeout in seconds and the socket, in the order nbd-client does.
func (d *KernelDevice) configure(sock *os.File, blockSize uint64, info ExportInfo, timeout int) error {
	for _, c := range []struct {
		name string
		req  uint
		arg  int
	}{
		{"NBD_SET_BLKSIZE", kernelSetBlockSize, int(blockSize)},
		{"NBD_SET_SIZE_BLOCKS", kernelSetSizeBlocks, int(info.Size / blockSize)},
		{"NBD_SET_FLAGS", kernelSetFlags, int(info.Flags)},
		{"NBD_SET_TIMEOUT", kernelSetTimeout, timeout},
	} {
		if err := d.ioctl(c.name, c.req, c.arg); err != nil {
			return err
		}
	}
	err := d.ioctl("NBD_SET_SOCK", kernelSetSock, int(sock.Fd()))
	if errors.Is(err, unix.EBUSY) {
		return fmt.Errorf("%s is in use: attached, or being set up, by another process", d.path)
	}
	return err
}

// run hands the device to the kernel (NBD_DO_IT) and returns when it is
// disconnected. The calling goroutine's thread blocks every signal: a
// signal landing on it would interrupt NBD_DO_IT, and the kernel then tears
// the device down without telling the server. The thread is never unlocked,
// so it ends with the goroutine rather than going back to the runtime with
// that signal mask.
func (d *KernelDevice) run() error {
	runtime.LockOSThread()
	var all unix.Sigset_t
	for i := range all.Val {
		all.Val[i] = ^all.Val[i]
	}
	if err := unix.PthreadSigmask(unix.SIG_BLOCK, &all, nil); err != nil {
		return fmt.Errorf("%s: block signals: %w", d.path, err)
	}
	return d.ioctl("NBD_DO_IT", kernelDoIt, 0)
}

// kernelSocket takes the connection's socket out of Go's network poller and
// returns it as a blocking file for the kernel, as nbd-client hands it over.
// conn is closed.
func kernelSocket(conn net.Conn) (*os.File, error) {
	filer, ok := conn.(interface{ File() (*os.File, error) })
	if !ok {
		conn.Close()
		return nil, fmt.Errorf("connection %s: not a socket", conn.RemoteAddr())
	}
	f, err := filer.File()
	conn.Close()
	if err != nil {
		return nil, fmt.Errorf("connection %s: %w", conn.RemoteAddr(), err)
	}
	f.Fd() // puts the socket in blocking mode
	return f, nil
}
