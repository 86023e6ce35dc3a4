//go:build linux

package nbd

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore/blockdev"
)

// helperMarker follows "--" on the command line of the test binary when it
// is re-executed as a server by these tests.
const helperMarker = "nbd-helper"

// helperCommand returns the command line that re-executes the test binary as
// a helper server: helperMain with mode and path.
func helperCommand(t *testing.T, mode, path string) []string {
	t.Helper()
	self, err := os.Executable()
	require.NoError(t, err)
	return []string{self, "-test.run=^TestHelperProcess$", "--", helperMarker, mode, path}
}

// TestHelperProcess is not a test: it is the entry point of the helper
// server processes, and skips in a normal run.
func TestHelperProcess(t *testing.T) {
	args := flagArgsAfterDashes()
	if len(args) < 3 || args[0] != helperMarker {
		t.Skip("only runs as a helper process")
	}
	if err := helperMain(args[1], args[2]); err != nil {
		fmt.Fprintln(os.Stderr, "nbd helper:", err)
		os.Exit(1)
	}
	// Exit before the testing package prints PASS on stdout, which may be
	// the NBD connection.
	os.Exit(0)
}

// flagArgsAfterDashes returns the command-line arguments after "--".
func flagArgsAfterDashes() []string {
	for i, a := range os.Args {
		if a == "--" {
			return os.Args[i+1:]
		}
	}
	return nil
}

// helperMain serves the file at path as the default export (named ""), which
// is what clients that launch a server ask for: on stdin/stdout in
// mode "stdio", on the socket-activated listener in mode "activated" (until
// SIGTERM).
func helperMain(mode, path string) error {
	dev, err := blockdev.Open(path, blockdev.Options{})
	if err != nil {
		return err
	}
	defer dev.Close()
	srv := NewServer([]Export{{Name: "", Backend: NewDeviceBackend(dev)}}, Options{})
	switch mode {
	case "stdio":
		return srv.ServeStdio(context.Background(), os.Stdin, os.Stdout)
	case "activated":
		ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
		defer stop()
		listeners, err := ListenersFromEnv()
		if err != nil {
			return err
		}
		if len(listeners) != 1 {
			return fmt.Errorf("got %d activated listeners, want 1", len(listeners))
		}
		for _, v := range []string{"LISTEN_PID", "LISTEN_FDS"} {
			if _, set := os.LookupEnv(v); set {
				return fmt.Errorf("%s still set", v)
			}
		}
		served := make(chan error, 1)
		go func() { served <- srv.Serve(context.Background(), listeners[0]) }()
		<-ctx.Done()
		shutdownCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.Shutdown(shutdownCtx); err != nil {
			return err
		}
		if err := <-served; !errors.Is(err, ErrServerClosed) {
			return fmt.Errorf("serve: %w", err)
		}
		return nil
	}
	return fmt.Errorf("unknown helper mode %q", mode)
}

// randomImage writes a file of size random bytes and returns its path and
// content.
func randomImage(t *testing.T, size int) (string, []byte) {
	t.Helper()
	data := make([]byte, size)
	_, err := rand.Read(data)
	require.NoError(t, err)
	path := filepath.Join(t.TempDir(), "image.raw")
	require.NoError(t, os.WriteFile(path, data, 0o644))
	return path, data
}

func TestSocketActivation(t *testing.T) {
	nbdinfo := requireTool(t, "nbdinfo", "libnbd-bin")
	nbdcopy := requireTool(t, "nbdcopy", "libnbd-bin")
	path, data := randomImage(t, 2<<20)

	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := l.Addr().String()
	lf, err := l.(*net.TCPListener).File()
	require.NoError(t, err)
	require.NoError(t, l.Close())

	// The shell learns its pid before exec'ing the server under it, as
	// systemd sets LISTEN_PID between fork and exec.
	args := append([]string{"-c", `export LISTEN_PID=$$; exec "$0" "$@"`}, helperCommand(t, "activated", path)...)
	cmd := exec.Command("/bin/sh", args...)
	cmd.Env = append(os.Environ(), "LISTEN_FDS=1", "LISTEN_FDNAMES=nbd")
	cmd.ExtraFiles = []*os.File{lf} // fd 3
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	require.NoError(t, cmd.Start())
	lf.Close()
	exited := false
	t.Cleanup(func() {
		if !exited {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
		}
	})

	out := runTool(t, nbdinfo, "--json", "nbd://"+addr+"/")
	var info struct {
		Exports []struct {
			Size int64 `json:"export-size"`
		} `json:"exports"`
	}
	require.NoError(t, json.Unmarshal([]byte(out), &info), out)
	require.Len(t, info.Exports, 1)
	assert.Equal(t, int64(len(data)), info.Exports[0].Size)

	copied := filepath.Join(t.TempDir(), "copy.raw")
	runTool(t, nbdcopy, "nbd://"+addr+"/", copied)
	got, err := os.ReadFile(copied)
	require.NoError(t, err)
	assert.True(t, bytes.Equal(data, got), "data read through the activated server differs")

	require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
	err = cmd.Wait()
	exited = true
	assert.NoError(t, err, "helper: %s", stderr.String())
}

func TestListenersFromEnv(t *testing.T) {
	t.Run("not activated", func(t *testing.T) {
		t.Setenv("LISTEN_PID", "")
		t.Setenv("LISTEN_FDS", "")
		os.Unsetenv("LISTEN_PID")
		os.Unsetenv("LISTEN_FDS")
		ls, err := ListenersFromEnv()
		require.NoError(t, err)
		assert.Empty(t, ls)
	})
	t.Run("another process's sockets", func(t *testing.T) {
		t.Setenv("LISTEN_PID", strconv.Itoa(os.Getppid()))
		t.Setenv("LISTEN_FDS", "1")
		ls, err := ListenersFromEnv()
		require.NoError(t, err)
		assert.Empty(t, ls)
		_, set := os.LookupEnv("LISTEN_FDS")
		assert.False(t, set, "unset even when not for us")
	})
	t.Run("no sockets", func(t *testing.T) {
		t.Setenv("LISTEN_PID", strconv.Itoa(os.Getpid()))
		t.Setenv("LISTEN_FDS", "0")
		ls, err := ListenersFromEnv()
		require.NoError(t, err)
		assert.Nil(t, ls)
	})
	t.Run("bad count", func(t *testing.T) {
		t.Setenv("LISTEN_PID", strconv.Itoa(os.Getpid()))
		t.Setenv("LISTEN_FDS", "many")
		_, err := ListenersFromEnv()
		assert.ErrorContains(t, err, `"many"`)
	})
}

// libnbd 1.14's nbdinfo and nbdcopy start a "[ CMD ]" server with socket
// activation (a unix socket on fd 3).
func TestSocketActivationWithNbdinfo(t *testing.T) {
	nbdinfo := requireTool(t, "nbdinfo", "libnbd-bin")
	nbdcopy := requireTool(t, "nbdcopy", "libnbd-bin")
	path, data := randomImage(t, 1<<20+4096)

	cmdline := append(append([]string{"--json", "--", "["}, helperCommand(t, "activated", path)...), "]")
	out := runTool(t, nbdinfo, cmdline...)
	var info struct {
		Exports []struct {
			Size int64 `json:"export-size"`
		} `json:"exports"`
	}
	require.NoError(t, json.Unmarshal([]byte(out), &info), out)
	require.Len(t, info.Exports, 1)
	assert.Equal(t, int64(len(data)), info.Exports[0].Size)

	copied := filepath.Join(t.TempDir(), "copy.raw")
	cmdline = append(append([]string{"--", "["}, helperCommand(t, "activated", path)...), "]", copied)
	runTool(t, nbdcopy, cmdline...)
	got, err := os.ReadFile(copied)
	require.NoError(t, err)
	assert.True(t, bytes.Equal(data, got), "data read through the activated server differs")
}

// libnbd's connect_command runs a server on a socketpair as its stdin and
// stdout, which is ServeStdio's socket case.
func TestStdioWithLibnbd(t *testing.T) {
	py := libnbdPython(t)
	path, data := randomImage(t, 1<<20+4096)
	script := `
import sys, nbd
h = nbd.NBD()
h.connect_command(sys.argv[3:])
print(h.get_size())
sys.stdout.write(h.pread(4096, int(sys.argv[1])).hex() + "\n")
h.pwrite(b"via stdio", int(sys.argv[2]))
h.flush()
h.shutdown()
`
	args := append([]string{"-c", script, "8192", "65536"}, helperCommand(t, "stdio", path)...)
	out := runTool(t, py, args...)
	assert.Equal(t, fmt.Sprintf("%d\n%x\n", len(data), data[8192:8192+4096]), out)
	onDisk, err := os.ReadFile(path)
	require.NoError(t, err)
	assert.Equal(t, "via stdio", string(onDisk[65536:65536+9]))
}

func TestServeStdioPipes(t *testing.T) {
	mem := newMemBackend(1 << 20)
	copy(mem.data[512:], "stdio")
	srv := NewServer([]Export{{Name: "disk", Backend: mem}}, Options{})
	serverIn, clientOut, err := os.Pipe()
	require.NoError(t, err)
	clientIn, serverOut, err := os.Pipe()
	require.NoError(t, err)
	client := &pipeConn{in: clientIn, out: clientOut}
	rc := &rawClient{t: t, conn: client, served: make(chan struct{})}
	served := make(chan error, 1)
	go func() {
		defer close(rc.served)
		served <- srv.ServeStdio(context.Background(), serverIn, serverOut)
	}()
	t.Cleanup(func() {
		client.Close()
		<-rc.served
	})

	var greeting [18]byte
	rc.read(greeting[:])
	require.Equal(t, nbdMagic, binary.BigEndian.Uint64(greeting[0:]))
	rc.sendFlags(clientFlagFixedNewstyle | clientFlagNoZeroes)
	size, _ := rc.goExport("disk")
	assert.Equal(t, uint64(1<<20), size)
	rc.sendRequest(0, cmdRead, 1, 512, 5, nil)
	errno, _ := rc.readSimpleReply()
	require.Equal(t, uint32(0), errno)
	got := make([]byte, 5)
	rc.read(got)
	assert.Equal(t, "stdio", string(got))

	// Shutdown interrupts the idle pipe read: the pipes were made pollable.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	require.NoError(t, srv.Shutdown(ctx))
	rc.requireClosed()
	assert.NoError(t, <-served)
}
