package guest

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// Setup builds an initramfs for cfg in a temporary directory of t, for the
// guests of one test (and its subtests: share it rather than build one per
// boot).
//
// When QEMU, the kernel, busybox or one of cfg.Binaries is not installed, it
// skips t with the Debian package to install, unless the environment
// variable CI is "true": CI fails instead, so that it cannot pass without
// running the guests.
func Setup(t testing.TB, cfg Config) *Initramfs {
	t.Helper()
	for _, program := range append(append([]string{QEMU, Busybox}, cfg.Binaries...), cfg.HostPrograms...) {
		if _, err := LookProgram(program); err != nil {
			missing(t, "%v: apt-get install %s", err, debianPackage(program))
		}
	}
	if cfg.Kernel == (Kernel{}) {
		k, err := FindKernel()
		if err != nil {
			missing(t, "%v", err)
		}
		cfg.Kernel = k
	}
	r, err := Build(t.Context(), t.TempDir(), cfg)
	if err != nil {
		t.Fatalf("build initramfs: %v", err)
	}
	return r
}

// missing skips t outside CI, and fails it in CI.
func missing(t testing.TB, format string, args ...any) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatalf("CI=true, guest tests must run: "+format, args...)
		return
	}
	t.Skipf("skipping guest test: "+format, args...)
}

// debianPackage names the package that installs a program.
func debianPackage(program string) string {
	switch filepath.Base(program) {
	case QEMU:
		return "qemu-system-x86"
	case Busybox:
		return "busybox-static"
	case "dmsetup":
		return "dmsetup"
	case "nbd-client":
		return "nbd-client"
	case Netcat:
		return "netcat-openbsd"
	case "mkfs.ext4", "mke2fs", "e2fsck", "fsck.ext4", "debugfs":
		return "e2fsprogs"
	}
	return "the package that provides " + program
}

// Boot runs a guest and fails t unless its script exits with status 0. The
// console goes to t's log line by line as it arrives, and the script's output
// is part of the failure message.
func Boot(ctx context.Context, t testing.TB, r *Initramfs, opts Options) *Result {
	t.Helper()
	log := &lineLogger{t: t}
	if opts.Console != nil {
		opts.Console = io.MultiWriter(opts.Console, log)
	} else {
		opts.Console = log
	}
	res, err := r.Run(ctx, opts)
	log.flush()
	if err != nil {
		t.Fatalf("guest: %v", err)
	}
	if res.Status != 0 {
		t.Fatalf("guest script exited with status %d after %v; output:\n%s\nconsole tail:\n%s",
			res.Status, res.Elapsed, res.Output, tail(res.Console, 60))
	}
	t.Logf("guest script done in %v", res.Elapsed)
	return res
}

// lineLogger logs whole lines to a test's log, without carriage returns.
type lineLogger struct {
	t   testing.TB
	mu  sync.Mutex
	buf []byte
}

func (l *lineLogger) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.buf = append(l.buf, p...)
	for {
		i := bytes.IndexByte(l.buf, '\n')
		if i < 0 {
			return len(p), nil
		}
		l.t.Log("console: " + strings.TrimRight(string(l.buf[:i]), "\r"))
		l.buf = l.buf[i+1:]
	}
}

// flush logs a last line that has no newline.
func (l *lineLogger) flush() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if s := strings.TrimRight(string(l.buf), "\r"); s != "" {
		l.t.Log("console: " + s)
	}
	l.buf = nil
}
