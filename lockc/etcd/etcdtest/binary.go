package etcdtest

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// Binary is an etcd server run from an executable (Debian's etcd-server
// package installs /usr/bin/etcd), on 127.0.0.1.
type Binary struct {
	// Endpoint is its client URL.
	Endpoint string
	// Version is what the server reports of itself.
	Version string
}

// BinaryPath is where Debian's etcd-server installs the server.
const BinaryPath = "/usr/bin/etcd"

// StartBinary runs the etcd executable at path as a one-member cluster in a
// temporary directory, on free loopback ports, and waits until it answers.
// It is killed at tb's cleanup.
func StartBinary(tb testing.TB, path string) *Binary {
	tb.Helper()
	dir := tb.TempDir()
	client, peer := freePort(tb), freePort(tb)
	cu, pu := fmt.Sprintf("http://127.0.0.1:%d", client), fmt.Sprintf("http://127.0.0.1:%d", peer)
	log, err := os.Create(filepath.Join(dir, "etcd.log"))
	if err != nil {
		tb.Fatal(err)
	}
	cmd := exec.Command(path,
		"--name", "bin1", "--data-dir", filepath.Join(dir, "data"),
		"--listen-client-urls", cu, "--advertise-client-urls", cu,
		"--listen-peer-urls", pu, "--initial-advertise-peer-urls", pu,
		"--initial-cluster", "bin1="+pu, "--initial-cluster-state", "new")
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		tb.Fatalf("start %s: %v", path, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	tb.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
		log.Close()
	})
	c, err := clientv3.New(clientv3.Config{Endpoints: []string{cu}, DialTimeout: 2 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		tb.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), startBound)
	defer cancel()
	for {
		select {
		case err := <-exited:
			out, _ := os.ReadFile(log.Name())
			tb.Fatalf("%s exited: %v\n%s", path, err, out)
		default:
		}
		actx, acancel := context.WithTimeout(ctx, time.Second)
		st, err := c.Status(actx, cu)
		acancel()
		if err == nil {
			return &Binary{Endpoint: cu, Version: st.Version}
		}
		if ctx.Err() != nil {
			out, _ := os.ReadFile(log.Name())
			tb.Fatalf("%s: not answering after %v: %v\n%s", path, startBound, err, out)
		}
		// Not listening yet: ask again shortly.
		t := time.NewTimer(50 * time.Millisecond)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
		}
	}
}

// freePort returns a loopback TCP port that was free a moment ago.
func freePort(tb testing.TB) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}
