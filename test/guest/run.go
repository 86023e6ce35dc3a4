package guest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// QEMU is the emulator program that boots the guests (Debian package
// qemu-system-x86).
const QEMU = "qemu-system-x86_64"

// KernelCommandLine is what the guest kernel boots with: the console on the
// serial port (QEMU's stdout), few messages, and a panic ends the guest at
// once (with -no-reboot, QEMU exits).
const KernelCommandLine = "console=ttyS0 quiet panic=-1"

// ErrNoEndMarker is returned by Run when the guest stopped (or was stopped)
// before /init printed the script's end marker: the kernel panicked, the
// script powered the guest off itself, or the context ended.
var ErrNoEndMarker = errors.New("guest stopped before the script's end marker")

// Disk is a raw image attached to a guest as a virtio disk. The guest sees
// the disks of a boot as /dev/vda, /dev/vdb, ... in the order given. QEMU
// opens them with cache=none (O_DIRECT on the host), so the image file must
// be on a file system that supports O_DIRECT.
type Disk struct {
	Path     string
	ReadOnly bool
	// Shared lets another guest use the image at the same time: QEMU takes
	// no lock on it and the device allows shared writers. Guests must then
	// read it with O_DIRECT to see each other's writes.
	Shared bool
}

// Options describe one boot.
type Options struct {
	// Script is run by busybox sh in /tmp, with stdin from /dev/null and
	// stdout and stderr on the console. Its exit status is Result.Status.
	Script string
	// Disks are the virtio disks.
	Disks []Disk
	// MemoryMiB is the guest's memory; 512 when zero.
	MemoryMiB int
	// QEMUArgs are added to QEMU's command line, e.g. a network device.
	QEMUArgs []string
	// SingleThreadTCG runs all of the guest's CPUs (QEMUArgs "-smp N") in
	// one host thread instead of one thread each: slower, but the guest's
	// CPUs do not compete with each other and with other guests for the
	// host's cores.
	SingleThreadTCG bool
	// Console, if set, receives the serial console as it arrives.
	Console io.Writer
}

// Result is what a boot returned.
type Result struct {
	Output  string        // what the script printed, carriage returns removed
	Status  int           // the script's exit status
	Console string        // the whole serial console, carriage returns removed
	Elapsed time.Duration // from QEMU's start to its exit
}

// Run boots the kernel with the initramfs and opts.Script, waits for the
// guest to power off and returns the script's output and exit status. The
// guest is killed when ctx ends. A failing script is not an error: its
// status is in the Result. The Result is returned with the error when the
// guest got as far as printing anything.
func (r *Initramfs) Run(ctx context.Context, opts Options) (*Result, error) {
	qemu, err := LookProgram(QEMU)
	if err != nil {
		return nil, err
	}
	token, err := newToken()
	if err != nil {
		return nil, err
	}
	initrd, err := r.bootInitrd(opts, token)
	if err != nil {
		return nil, err
	}
	defer os.Remove(initrd)

	memory := opts.MemoryMiB
	if memory == 0 {
		memory = 512
	}
	accel := "tcg"
	if opts.SingleThreadTCG {
		accel = "tcg,thread=single"
	}
	args := []string{
		"-accel", accel, "-m", strconv.Itoa(memory), "-nographic", "-no-reboot", "-nic", "none",
		"-kernel", r.Kernel.Image, "-initrd", initrd, "-append", KernelCommandLine,
	}
	args = append(args, diskArgs(opts.Disks)...)
	args = append(args, opts.QEMUArgs...)

	var console, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, qemu, args...)
	cmd.Stdin = nil
	cmd.Stdout = &console
	if opts.Console != nil {
		cmd.Stdout = io.MultiWriter(&console, opts.Console)
	}
	cmd.Stderr = &stderr
	cmd.WaitDelay = 5 * time.Second
	start := time.Now()
	runErr := cmd.Run()
	res := &Result{Console: strings.ReplaceAll(console.String(), "\r", ""), Elapsed: time.Since(start)}
	if ctx.Err() != nil {
		return res, fmt.Errorf("guest %s after %v: %w: %w\nconsole tail:\n%s", r.Kernel.Release, res.Elapsed.Round(time.Second), ErrNoEndMarker, ctx.Err(), tail(res.Console, 30))
	}
	if runErr != nil {
		return res, fmt.Errorf("guest %s: %s: %w: %s\nconsole tail:\n%s", r.Kernel.Release, QEMU, runErr, strings.TrimSpace(stderr.String()), tail(res.Console, 30))
	}
	output, status, ok := scriptOutput(res.Console, token)
	if !ok {
		return res, fmt.Errorf("guest %s: %w\nconsole tail:\n%s", r.Kernel.Release, ErrNoEndMarker, tail(res.Console, 30))
	}
	res.Output, res.Status = output, status
	return res, nil
}

// bootInitrd writes the initrd of one boot next to the base initramfs: a
// small uncompressed archive with the script and its environment, followed
// by the base archive. The kernel unpacks concatenated archives in turn, as
// it does for early microcode.
func (r *Initramfs) bootInitrd(opts Options, token string) (string, error) {
	f, err := os.CreateTemp(filepath.Dir(r.Path), "boot-*.cpio")
	if err != nil {
		return "", fmt.Errorf("initrd: %w", err)
	}
	name := f.Name()
	fail := func(err error) (string, error) {
		f.Close()
		os.Remove(name)
		return "", fmt.Errorf("initrd %s: %w", name, err)
	}
	cw := newCPIOWriter(f)
	cw.File("/guest/script.sh", 0o755, []byte(opts.Script))
	cw.File("/guest/env", 0o644, fmt.Appendf(nil, "GUEST_TOKEN=%s\nGUEST_DISKS=%d\n", token, len(opts.Disks)))
	if err := cw.Close(); err != nil {
		return fail(err)
	}
	base, err := os.Open(r.Path)
	if err != nil {
		return fail(err)
	}
	defer base.Close()
	if _, err := io.Copy(f, base); err != nil {
		return fail(err)
	}
	if err := f.Close(); err != nil {
		return fail(err)
	}
	return name, nil
}

// diskArgs are QEMU's options for the disks, each a virtio-blk PCI device in
// order, so that the guest names them vda, vdb, ... in the same order.
func diskArgs(disks []Disk) []string {
	var args []string
	for i, d := range disks {
		drive := fmt.Sprintf("file=%s,format=raw,if=none,id=disk%d,cache=none", strings.ReplaceAll(d.Path, ",", ",,"), i)
		device := fmt.Sprintf("virtio-blk-pci,drive=disk%d", i)
		if d.ReadOnly {
			drive += ",readonly=on"
		}
		if d.Shared {
			drive += ",file.locking=off"
			device += ",share-rw=on"
		}
		args = append(args, "-drive", drive, "-device", device)
	}
	return args
}

// newToken returns a random marker token, so that nothing but /init prints
// the markers.
func newToken() (string, error) {
	b := make([]byte, 8)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("guest token: %w", err)
	}
	return hex.EncodeToString(b), nil
}

// scriptOutput cuts the script's output out of the console by /init's
// markers and reads its exit status from the end marker.
func scriptOutput(console, token string) (output string, status int, ok bool) {
	begin := "@@guest-begin " + token + "@@\n"
	i := strings.Index(console, begin)
	if i < 0 {
		return "", 0, false
	}
	rest := console[i+len(begin):]
	end := regexp.MustCompile(`@@guest-end ` + regexp.QuoteMeta(token) + ` status=(\d+)@@`)
	m := end.FindStringSubmatchIndex(rest)
	if m == nil {
		return "", 0, false
	}
	status, err := strconv.Atoi(rest[m[2]:m[3]])
	if err != nil {
		return "", 0, false
	}
	return rest[:m[0]], status, true
}

// tail returns the last n lines of s.
func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
