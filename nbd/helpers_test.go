package nbd

import (
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// testServer is a running server and where to reach it.
type testServer struct {
	srv *Server
	// addr is host:port for TCP servers.
	addr string
	// socket is the path for unix-socket servers.
	socket string
}

// uri returns the NBD URI of export name on the server.
func (ts *testServer) uri(name string) string {
	if ts.socket != "" {
		return "nbd+unix:///" + name + "?socket=" + ts.socket
	}
	return "nbd://" + ts.addr + "/" + name
}

// startServer serves exports on 127.0.0.1:0, or on a unix socket in a
// temporary directory when unix is set. The server is shut down, and Serve's
// result checked, when the test ends.
func startServer(t testing.TB, exports []Export, opts Options, unix bool) *testServer {
	t.Helper()
	ts := &testServer{srv: NewServer(exports, opts)}
	var l net.Listener
	var err error
	if unix {
		// Socket paths are limited to ~108 bytes; t.TempDir can be longer.
		dir, mkErr := os.MkdirTemp("", "nbdtest")
		require.NoError(t, mkErr)
		t.Cleanup(func() { os.RemoveAll(dir) })
		ts.socket = filepath.Join(dir, "nbd.sock")
		l, err = net.Listen("unix", ts.socket)
	} else {
		l, err = net.Listen("tcp", "127.0.0.1:0")
	}
	require.NoError(t, err)
	ts.addr = l.Addr().String()
	served := make(chan error, 1)
	go func() { served <- ts.srv.Serve(context.Background(), l) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		require.NoError(t, ts.srv.Shutdown(ctx))
		require.ErrorIs(t, <-served, ErrServerClosed)
	})
	return ts
}

// requireTool returns the path of a client program, skipping the test when
// it is missing (failing instead when CI=true).
func requireTool(t testing.TB, name, debianPackage string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err != nil {
		missingClient(t, name+" not found", debianPackage)
	}
	return path
}

// missingClient skips the test, or fails it when CI=true, naming the Debian
// package that provides the missing client.
func missingClient(t testing.TB, what, debianPackage string) {
	t.Helper()
	msg := what + "; install the Debian package " + debianPackage
	if os.Getenv("CI") == "true" {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

// runTool runs a client program and returns its combined output, failing the
// test if it does not exit 0.
func runTool(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := runToolStatus(t, name, args...)
	require.NoError(t, err, "%s %q failed:\n%s", name, args, out)
	return out
}

// runToolStatus runs a client program and returns its output and exit error.
func runToolStatus(t testing.TB, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = t.TempDir() // fio leaves state files behind
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("%s %q timed out:\n%s", name, args, out)
	}
	return string(out), err
}

// exitCode returns the exit status of a runToolStatus error, 0 for nil.
func exitCode(t testing.TB, err error) int {
	t.Helper()
	if err == nil {
		return 0
	}
	var ee *exec.ExitError
	require.True(t, errors.As(err, &ee), "not an exit status: %v", err)
	return ee.ExitCode()
}

// libnbdPython returns a Python interpreter that can import libnbd's
// bindings (a pyenv or venv python3 earlier in PATH may not).
func libnbdPython(t *testing.T) string {
	t.Helper()
	for _, py := range []string{"/usr/bin/python3", "python3"} {
		cmd := exec.Command(py, "-c", "import nbd")
		cmd.Dir = t.TempDir()
		if cmd.Run() == nil {
			return py
		}
	}
	missingClient(t, "no python3 can import libnbd's nbd module", "python3-libnbd")
	return ""
}

// pageSize is the allocation unit of memBackend.
const pageSize = 4096

// memBackend is an in-memory Backend that tracks which 4 KiB pages were ever
// written, so that it can report base:allocation extents; trimmed and zeroed
// pages become holes again.
type memBackend struct {
	mu        sync.Mutex
	data      []byte
	allocated []bool
	flushes   int
}

func newMemBackend(size int64) *memBackend {
	return &memBackend{data: make([]byte, size), allocated: make([]bool, (size+pageSize-1)/pageSize)}
}

func (m *memBackend) Size() int64 { return int64(len(m.data)) }

func (m *memBackend) ReadAt(_ context.Context, p []byte, off int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	copy(p, m.data[off:])
	return nil
}

func (m *memBackend) WriteAt(_ context.Context, p []byte, off int64, _ bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	copy(m.data[off:], p)
	for pg := off / pageSize; pg*pageSize < off+int64(len(p)); pg++ {
		m.allocated[pg] = true
	}
	return nil
}

func (m *memBackend) Flush(context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.flushes++
	return nil
}

func (m *memBackend) Trim(ctx context.Context, off, length int64, _ bool) error {
	return m.WriteZeroes(ctx, off, length, ZeroOptions{})
}

// WriteZeroes clears the range and deallocates the pages wholly inside it,
// unless NoHole asks to keep them.
func (m *memBackend) WriteZeroes(_ context.Context, off, length int64, opts ZeroOptions) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.data[off : off+length])
	if opts.NoHole {
		for pg := off / pageSize; pg*pageSize < off+length; pg++ {
			m.allocated[pg] = true
		}
		return nil
	}
	for pg := (off + pageSize - 1) / pageSize; (pg+1)*pageSize <= off+length; pg++ {
		m.allocated[pg] = false
	}
	return nil
}

func (m *memBackend) Extents(_ context.Context, off, length int64) ([]Extent, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []Extent
	for pos := off; pos < off+length; {
		pg := pos / pageSize
		state := m.allocated[pg]
		end := (pg + 1) * pageSize
		for end < int64(len(m.data)) && m.allocated[end/pageSize] == state {
			end += pageSize
		}
		end = min(end, int64(len(m.data)))
		out = append(out, Extent{Length: end - pos, Hole: !state, Zero: !state})
		pos = end
	}
	return out, nil
}
