package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/pojntfx/go-nbd/pkg/protocol"
	"golang.org/x/sys/unix"
)

// attach and detach speak the NBD handshake themselves and then hand the
// socket to the kernel's nbd driver with its ioctls, as nbd-client does.
// (go-nbd's client, used before, sent NBD_OPT_GO with a zero option length,
// which servers that follow the protocol refuse, and never passed the
// transmission flags to the kernel, so the device got no flushes, FUA or
// read-only flag.)

// Handshake values that go-nbd's protocol package lacks, and our limits.
const (
	nbdOldstyleMagic = 0x0000420281861253
	nbdFlagNoZeroes  = 1 << 1
	nbdRepErrorBit   = 1 << 31
	// nbdTransmissionReadOnly is the transmission flag of a read-only export.
	nbdTransmissionReadOnly = 1 << 1
	// nbdMaxOptionReply bounds an option reply's payload: the handshake's
	// replies are a few bytes, error messages a line.
	nbdMaxOptionReply = 64 << 10
	// nbdHandshakeTimeout bounds the handshake with the server.
	nbdHandshakeTimeout = time.Minute
)

// nbdOptionError names an NBD_REP_ERR_* reply.
func nbdOptionError(typ uint32) string {
	switch typ &^ nbdRepErrorBit {
	case 1:
		return "option not supported by the server"
	case 2:
		return "refused by the server's policy"
	case 3:
		return "invalid request"
	case 4:
		return "not supported on the server's platform"
	case 5:
		return "the server requires TLS"
	case 6:
		return "no such export"
	case 7:
		return "the server is shutting down"
	case 8:
		return "the server requires block size negotiation"
	case 9:
		return "request too big"
	}
	return fmt.Sprintf("error %#x", typ)
}

// The nbd driver's ioctls (linux/nbd.h) and block major number.
const (
	nbdSetSock       = 0xab00
	nbdSetBlockSize  = 0xab01
	nbdDoIt          = 0xab03
	nbdClearSock     = 0xab04
	nbdSetSizeBlocks = 0xab07
	nbdDisconnect    = 0xab08
	nbdSetTimeout    = 0xab09
	nbdSetFlags      = 0xab0a
	nbdMajor         = 43
)

// nbdReadyPoll is how often attach looks whether the kernel has started the
// device (NBD_DO_IT blocks, and says nothing when the device is up).
const nbdReadyPoll = 5 * time.Millisecond

// nbdDevice is an open /dev/nbdN.
type nbdDevice struct {
	*os.File
	path  string
	minor uint32
}

// openNBDDevice opens /dev/nbdN (the ioctls need no more than reading),
// checks that it is one of the nbd driver's devices, and explains the usual
// reasons it is missing.
func openNBDDevice(path string) (*nbdDevice, error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%s: no such device: %s", path, nbdDevicesHint())
	}
	if err != nil {
		return nil, err
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFBLK || unix.Major(st.Rdev) != nbdMajor {
		f.Close()
		return nil, fmt.Errorf("%s: not an nbd device (use /dev/nbdN: %s)", path, nbdDevicesHint())
	}
	return &nbdDevice{File: f, path: path, minor: unix.Minor(st.Rdev)}, nil
}

// nbdDevicesHint says which nbd devices there are, or how to get them.
func nbdDevicesHint() string {
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

// ioctl runs one of the nbd driver's ioctls on the device.
func (d *nbdDevice) ioctl(name string, req uint, arg int) error {
	if err := unix.IoctlSetInt(int(d.Fd()), req, arg); err != nil {
		return fmt.Errorf("%s: %s: %w", d.path, name, err)
	}
	return nil
}

// started reports whether the kernel runs the device: it adds the pid
// attribute when NBD_DO_IT has started it and removes it when it stops.
func (d *nbdDevice) started() bool {
	_, err := os.Stat(fmt.Sprintf("/sys/dev/block/%d:%d/pid", nbdMajor, d.minor))
	return err == nil
}

// detach writes the device's dirty pages back to the server (with a flush),
// then has the kernel disconnect from the server and drop the socket, which
// ends attach's NBD_DO_IT. The device is detached even when the write-back
// fails, and the error says so.
func (d *nbdDevice) detach() error {
	syncErr := d.Sync()
	if err := d.ioctl("NBD_DISCONNECT", nbdDisconnect, 0); err != nil {
		return err
	}
	if err := d.ioctl("NBD_CLEAR_SOCK", nbdClearSock, 0); err != nil {
		return err
	}
	if syncErr != nil {
		return fmt.Errorf("%s detached, but writing its cached data back failed: %w", d.path, syncErr)
	}
	return nil
}

// run hands the device to the kernel (NBD_DO_IT) and returns when it is
// disconnected. The calling goroutine's thread blocks every signal: a
// signal landing on it would interrupt NBD_DO_IT, and the kernel then tears
// the device down without telling the server. The thread is never unlocked,
// so it ends with the goroutine rather than going back to the runtime with
// that signal mask.
func (d *nbdDevice) run() error {
	runtime.LockOSThread()
	var all unix.Sigset_t
	for i := range all.Val {
		all.Val[i] = ^all.Val[i]
	}
	if err := unix.PthreadSigmask(unix.SIG_BLOCK, &all, nil); err != nil {
		return fmt.Errorf("%s: block signals: %w", d.path, err)
	}
	return d.ioctl("NBD_DO_IT", nbdDoIt, 0)
}

// configure gives the kernel the export's geometry and flags, the request
// timeout and the socket, in the order nbd-client does.
func (d *nbdDevice) configure(sock *os.File, blockSize uint64, info exportInfo, timeout int) error {
	for _, c := range []struct {
		name string
		req  uint
		arg  int
	}{
		{"NBD_SET_BLKSIZE", nbdSetBlockSize, int(blockSize)},
		{"NBD_SET_SIZE_BLOCKS", nbdSetSizeBlocks, int(info.size / blockSize)},
		{"NBD_SET_FLAGS", nbdSetFlags, int(info.flags)},
		{"NBD_SET_TIMEOUT", nbdSetTimeout, timeout},
	} {
		if err := d.ioctl(c.name, c.req, c.arg); err != nil {
			return err
		}
	}
	err := d.ioctl("NBD_SET_SOCK", nbdSetSock, int(sock.Fd()))
	if errors.Is(err, unix.EBUSY) {
		return fmt.Errorf("%s is in use: attached, or being set up, by another process", d.path)
	}
	return err
}

// exportInfo is what the server said about an export in the handshake.
type exportInfo struct {
	size  uint64
	flags uint16 // transmission flags
	// minBlock and maxBlock are the server's block size constraints, zero
	// when it sent none.
	minBlock, maxBlock uint32
}

// negotiateExport runs the fixed newstyle handshake on conn and selects
// export with NBD_OPT_GO; transmission starts right after it.
func negotiateExport(conn io.ReadWriter, export string) (exportInfo, error) {
	var greeting [18]byte
	if _, err := io.ReadFull(conn, greeting[:]); err != nil {
		return exportInfo{}, fmt.Errorf("read greeting: %w", err)
	}
	if binary.BigEndian.Uint64(greeting[0:]) != protocol.NEGOTIATION_MAGIC_OLDSTYLE {
		return exportInfo{}, errors.New("not an NBD server (bad greeting)")
	}
	switch binary.BigEndian.Uint64(greeting[8:]) {
	case protocol.NEGOTIATION_MAGIC_OPTION:
	case nbdOldstyleMagic:
		return exportInfo{}, errors.New("oldstyle NBD server without exports: use nbd-client")
	default:
		return exportInfo{}, errors.New("not an NBD server (bad greeting)")
	}
	serverFlags := binary.BigEndian.Uint16(greeting[16:])
	if serverFlags&protocol.NEGOTIATION_HANDSHAKE_FLAG_FIXED_NEWSTYLE == 0 {
		return exportInfo{}, errors.New("the server does not speak fixed newstyle NBD: use nbd-client")
	}
	clientFlags := uint32(protocol.NEGOTIATION_HANDSHAKE_FLAG_FIXED_NEWSTYLE)
	if serverFlags&nbdFlagNoZeroes != 0 {
		clientFlags |= nbdFlagNoZeroes
	}

	// NBD_OPT_GO: the name, and a request for the block size constraints
	// (which also tells the server that the client honours them).
	var data []byte
	data = binary.BigEndian.AppendUint32(data, uint32(len(export)))
	data = append(data, export...)
	data = binary.BigEndian.AppendUint16(data, 1)
	data = binary.BigEndian.AppendUint16(data, protocol.NEGOTIATION_TYPE_INFO_BLOCKSIZE)
	var msg []byte
	msg = binary.BigEndian.AppendUint32(msg, clientFlags)
	msg = binary.BigEndian.AppendUint64(msg, protocol.NEGOTIATION_MAGIC_OPTION)
	msg = binary.BigEndian.AppendUint32(msg, protocol.NEGOTIATION_ID_OPTION_GO)
	msg = binary.BigEndian.AppendUint32(msg, uint32(len(data)))
	msg = append(msg, data...)
	if _, err := conn.Write(msg); err != nil {
		return exportInfo{}, fmt.Errorf("send NBD_OPT_GO: %w", err)
	}

	var info exportInfo
	gotExport := false
	for {
		var hdr [20]byte
		if _, err := io.ReadFull(conn, hdr[:]); err != nil {
			return exportInfo{}, fmt.Errorf("read the reply to NBD_OPT_GO: %w", err)
		}
		if binary.BigEndian.Uint64(hdr[0:]) != protocol.NEGOTIATION_MAGIC_REPLY || binary.BigEndian.Uint32(hdr[8:]) != protocol.NEGOTIATION_ID_OPTION_GO {
			return exportInfo{}, errors.New("malformed reply to NBD_OPT_GO")
		}
		typ, length := binary.BigEndian.Uint32(hdr[12:]), binary.BigEndian.Uint32(hdr[16:])
		if length > nbdMaxOptionReply {
			return exportInfo{}, fmt.Errorf("reply to NBD_OPT_GO of %d bytes", length)
		}
		payload := make([]byte, length)
		if _, err := io.ReadFull(conn, payload); err != nil {
			return exportInfo{}, fmt.Errorf("read the reply to NBD_OPT_GO: %w", err)
		}
		switch {
		case typ == protocol.NEGOTIATION_TYPE_REPLY_ACK:
			if !gotExport {
				return exportInfo{}, errors.New("the server sent no size for the export")
			}
			return info, nil
		case typ == protocol.NEGOTIATION_TYPE_REPLY_INFO && len(payload) >= 12 && binary.BigEndian.Uint16(payload) == protocol.NEGOTIATION_TYPE_INFO_EXPORT:
			info.size = binary.BigEndian.Uint64(payload[2:])
			info.flags = binary.BigEndian.Uint16(payload[10:])
			gotExport = true
		case typ == protocol.NEGOTIATION_TYPE_REPLY_INFO && len(payload) >= 14 && binary.BigEndian.Uint16(payload) == protocol.NEGOTIATION_TYPE_INFO_BLOCKSIZE:
			info.minBlock = binary.BigEndian.Uint32(payload[2:])
			info.maxBlock = binary.BigEndian.Uint32(payload[10:])
		case typ == protocol.NEGOTIATION_TYPE_REPLY_INFO:
			// Information the client did not ask for: ignored, as the
			// protocol says.
		case typ&nbdRepErrorBit != 0:
			reason := nbdOptionError(typ)
			if text := strings.TrimSpace(string(bytes.ToValidUTF8(payload, nil))); text != "" && text != reason {
				reason += fmt.Sprintf(" (server: %q)", text)
			}
			// End the negotiation as the protocol asks, rather than
			// just closing; the server's answer does not matter.
			var abort []byte
			abort = binary.BigEndian.AppendUint64(abort, protocol.NEGOTIATION_MAGIC_OPTION)
			abort = binary.BigEndian.AppendUint32(abort, protocol.NEGOTIATION_ID_OPTION_ABORT)
			abort = binary.BigEndian.AppendUint32(abort, 0)
			_, _ = conn.Write(abort)
			return exportInfo{}, errors.New(reason)
		default:
			return exportInfo{}, fmt.Errorf("unexpected reply %d to NBD_OPT_GO", typ)
		}
	}
}

// kernelSocket takes the connection's socket out of Go's network poller and
// returns it as a blocking file for the kernel, as nbd-client hands it over.
func kernelSocket(conn net.Conn) (*os.File, error) {
	filer, ok := conn.(interface{ File() (*os.File, error) })
	if !ok {
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
	dev, err := openNBDDevice(flags.Arg(0))
	if err != nil {
		return err
	}
	defer dev.Close()
	if dev.started() {
		return fmt.Errorf("%s is attached already (snapd detach %s)", dev.path, dev.path)
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
	if err := conn.SetDeadline(time.Now().Add(nbdHandshakeTimeout)); err != nil {
		return fmt.Errorf("connect to %s: %w", addr, err)
	}
	stopOnCancel := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
	info, err := negotiateExport(conn, *export)
	stopOnCancel()
	if err != nil {
		return fmt.Errorf("export %q of %s: %w", *export, addr, err)
	}
	bs := uint64(*blockSize)
	switch {
	case info.minBlock != 0 && bs < uint64(info.minBlock):
		return fmt.Errorf("export %q of %s: needs a block size of at least %d (--block-size)", *export, addr, info.minBlock)
	case info.maxBlock != 0 && bs > uint64(info.maxBlock):
		return fmt.Errorf("export %q of %s: takes a block size of at most %d (--block-size)", *export, addr, info.maxBlock)
	case info.size%bs != 0:
		return fmt.Errorf("export %q of %s: its size %d is not a multiple of the block size %d", *export, addr, info.size, bs)
	}
	sock, err := kernelSocket(conn)
	if err != nil {
		return err
	}
	defer sock.Close()

	if err := dev.configure(sock, bs, info, *timeout); err != nil {
		_ = dev.ioctl("NBD_CLEAR_SOCK", nbdClearSock, 0)
		return err
	}

	done := make(chan error, 1)
	go func() { done <- dev.run() }()
	tick := time.NewTicker(nbdReadyPoll)
	defer tick.Stop()
	for ready := false; ; {
		select {
		case err := <-done:
			// NBD_DO_IT returns once the device is disconnected: by
			// detach, or because the server went away.
			if err == nil {
				err = dev.ioctl("NBD_CLEAR_SOCK", nbdClearSock, 0)
			}
			if err != nil {
				return fmt.Errorf("export %q of %s: %w", *export, addr, err)
			}
			fmt.Fprintf(stdout, "%s detached\n", dev.path)
			return nil
		case <-ctx.Done():
			err := dev.detach()
			<-done
			if err != nil {
				return err
			}
			fmt.Fprintf(stdout, "%s detached\n", dev.path)
			return nil
		case <-tick.C:
			if ready || !dev.started() {
				continue
			}
			ready = true
			tick.Stop()
			mode := "read-write"
			if info.flags&nbdTransmissionReadOnly != 0 {
				mode = "read-only"
			}
			fmt.Fprintf(stdout, "attached export %q of %s to %s (%d bytes, %s); detach with snapd detach %s or Ctrl-C\n",
				*export, addr, dev.path, info.size, mode, dev.path)
		}
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
	if !dev.started() {
		return fmt.Errorf("%s is not attached", dev.path)
	}
	if err := dev.detach(); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "%s detached\n", dev.path)
	return nil
}
