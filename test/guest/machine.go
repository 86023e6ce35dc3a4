package guest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Machine is a guest started by Start: a QEMU process that runs until its
// script ends (and /init powers it off), until Kill, or until the context
// given to Start ends. Its console can be watched while it runs.
type Machine struct {
	token   string
	initrd  string
	cmd     *exec.Cmd
	console *consoleLog
	start   time.Time
	done    chan struct{} // closed when QEMU has exited
	waitErr error         // QEMU's exit, set before done is closed
	stderr  bytes.Buffer
	release string
}

// Start boots the kernel with the initramfs and opts.Script like Run, but
// returns as soon as QEMU runs. The guest is killed when ctx ends.
func (r *Initramfs) Start(ctx context.Context, opts Options) (*Machine, error) {
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

	m := &Machine{token: token, initrd: initrd, console: newConsoleLog(), done: make(chan struct{}), release: r.Kernel.Release}
	m.cmd = exec.CommandContext(ctx, qemu, args...)
	m.cmd.Stdout = m.console
	if opts.Console != nil {
		m.cmd.Stdout = io.MultiWriter(m.console, opts.Console)
	}
	m.cmd.Stderr = &m.stderr
	m.cmd.WaitDelay = 5 * time.Second
	m.start = time.Now()
	if err := m.cmd.Start(); err != nil {
		os.Remove(initrd)
		return nil, fmt.Errorf("guest %s: %s: %w", r.Kernel.Release, QEMU, err)
	}
	go func() {
		m.waitErr = m.cmd.Wait()
		os.Remove(initrd)
		m.console.stop()
		close(m.done)
	}()
	return m, nil
}

// Done is closed when the guest's QEMU has exited.
func (m *Machine) Done() <-chan struct{} { return m.done }

// Console returns the serial console so far, carriage returns removed.
func (m *Machine) Console() string { return m.console.String() }

// WaitConsole waits until the console holds text, and fails when the guest
// exits or ctx ends first.
func (m *Machine) WaitConsole(ctx context.Context, text string) error {
	for {
		changed := m.console.changed()
		if strings.Contains(m.console.String(), text) {
			return nil
		}
		select {
		case <-changed:
		case <-m.done:
			if strings.Contains(m.console.String(), text) {
				return nil
			}
			return fmt.Errorf("guest %s exited before printing %q: %w\nconsole tail:\n%s", m.release, text, m.exitErr(), tail(m.Console(), 30))
		case <-ctx.Done():
			return fmt.Errorf("guest %s: waiting for %q: %w\nconsole tail:\n%s", m.release, text, ctx.Err(), tail(m.Console(), 30))
		}
	}
}

// WaitBooted waits until /init has loaded the modules and starts the
// script.
func (m *Machine) WaitBooted(ctx context.Context) error {
	return m.WaitConsole(ctx, "@@guest-begin "+m.token+"@@")
}

// Kill ends QEMU at once (SIGKILL), as a power failure would end the
// guest, and waits for it to exit.
func (m *Machine) Kill() {
	if m.cmd.Process != nil {
		_ = m.cmd.Process.Kill()
	}
	<-m.done
}

// Wait waits for the guest to exit and returns what Run would.
func (m *Machine) Wait(ctx context.Context) (*Result, error) {
	select {
	case <-m.done:
	case <-ctx.Done():
		m.Kill()
	}
	res := &Result{Console: m.Console(), Elapsed: time.Since(m.start)}
	output, status, ok := scriptOutput(res.Console, m.token)
	if !ok {
		return res, fmt.Errorf("guest %s: %w: %w\nconsole tail:\n%s", m.release, ErrNoEndMarker, m.exitErr(), tail(res.Console, 30))
	}
	res.Output, res.Status = output, status
	return res, nil
}

// exitErr describes how QEMU exited; valid once done is closed.
func (m *Machine) exitErr() error {
	if m.waitErr == nil {
		return errors.New("qemu exited")
	}
	return fmt.Errorf("%s: %w: %s", QEMU, m.waitErr, strings.TrimSpace(m.stderr.String()))
}

// consoleLog collects a console and tells waiters when it grows.
type consoleLog struct {
	mu     sync.Mutex
	buf    bytes.Buffer
	notify chan struct{} // closed and replaced on every write
}

func newConsoleLog() *consoleLog { return &consoleLog{notify: make(chan struct{})} }

func (c *consoleLog) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.buf.Write(bytes.ReplaceAll(p, []byte("\r"), nil))
	close(c.notify)
	c.notify = make(chan struct{})
	return len(p), nil
}

// changed returns a channel closed at the next write.
func (c *consoleLog) changed() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.notify
}

// stop wakes every waiter a last time.
func (c *consoleLog) stop() {
	c.mu.Lock()
	defer c.mu.Unlock()
	close(c.notify)
	c.notify = make(chan struct{})
}

func (c *consoleLog) String() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.buf.String()
}
