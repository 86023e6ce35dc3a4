package etcdtest

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// BinaryPath is where Debian's etcd-server installs the server.
const BinaryPath = "/usr/bin/etcd"

// BinaryCluster is an etcd cluster whose members are processes of an etcd
// executable (Debian's etcd-server package installs /usr/bin/etcd), on
// 127.0.0.1. A member can be killed as a crash would end it.
type BinaryCluster struct {
	tb testing.TB
	// Version is what the servers report of themselves.
	Version string

	mu      sync.Mutex
	members []*binaryMember
}

// binaryMember is one etcd process.
type binaryMember struct {
	client string // client URL
	log    string // its output
	cmd    *exec.Cmd
	exited chan error // receives Wait's result once
	dead   bool
}

// StartBinaryCluster runs n members of the etcd executable at path, each
// in a temporary directory and on free loopback ports, and waits until
// every member answers and the cluster has a leader. They are killed at
// tb's cleanup.
func StartBinaryCluster(tb testing.TB, path string, n int) *BinaryCluster {
	tb.Helper()
	dir := tb.TempDir()
	c := &BinaryCluster{tb: tb}
	var initial []string
	peers := make([]string, n)
	for i := range n {
		peers[i] = fmt.Sprintf("http://127.0.0.1:%d", freePort(tb))
		initial = append(initial, fmt.Sprintf("bin%d=%s", i+1, peers[i]))
	}
	for i := range n {
		cu := fmt.Sprintf("http://127.0.0.1:%d", freePort(tb))
		m := &binaryMember{client: cu, log: filepath.Join(dir, fmt.Sprintf("etcd%d.log", i+1)), exited: make(chan error, 1)}
		log, err := os.Create(m.log)
		if err != nil {
			tb.Fatal(err)
		}
		m.cmd = exec.Command(path,
			"--name", fmt.Sprintf("bin%d", i+1), "--data-dir", filepath.Join(dir, fmt.Sprintf("data%d", i+1)),
			"--listen-client-urls", cu, "--advertise-client-urls", cu,
			"--listen-peer-urls", peers[i], "--initial-advertise-peer-urls", peers[i],
			"--initial-cluster", strings.Join(initial, ","), "--initial-cluster-state", "new")
		m.cmd.Stdout, m.cmd.Stderr = log, log
		err = m.cmd.Start()
		log.Close() // the process has its own descriptor
		if err != nil {
			tb.Fatalf("start %s: %v", path, err)
		}
		go func() { m.exited <- m.cmd.Wait() }()
		c.members = append(c.members, m)
	}
	tb.Cleanup(func() {
		for i := range c.members {
			c.Kill(i)
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), startBound)
	defer cancel()
	for i, m := range c.members {
		c.Version = c.waitMember(ctx, path, i, m)
	}
	return c
}

// waitMember waits until member i answers with a leader known, and
// returns its version.
func (c *BinaryCluster) waitMember(ctx context.Context, path string, i int, m *binaryMember) string {
	c.tb.Helper()
	cl, err := clientv3.New(clientv3.Config{Endpoints: []string{m.client}, DialTimeout: 2 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		c.tb.Fatal(err)
	}
	defer cl.Close()
	for {
		select {
		case err := <-m.exited:
			m.exited <- err
			out, _ := os.ReadFile(m.log)
			c.tb.Fatalf("%s (member %d) exited: %v\n%s", path, i, err, out)
		default:
		}
		actx, acancel := context.WithTimeout(ctx, time.Second)
		st, err := cl.Status(actx, m.client)
		acancel()
		if err == nil && st.Leader != 0 {
			return st.Version
		}
		if ctx.Err() != nil {
			out, _ := os.ReadFile(m.log)
			c.tb.Fatalf("%s (member %d): no leader after %v: %v\n%s", path, i, startBound, err, out)
		}
		// Not listening yet, or no leader yet: ask again shortly.
		t := time.NewTimer(50 * time.Millisecond)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
		}
	}
}

// Endpoints are the members' client URLs, killed ones included.
func (c *BinaryCluster) Endpoints() []string {
	var eps []string
	for _, m := range c.members {
		eps = append(eps, m.client)
	}
	return eps
}

// Kill kills member i with SIGKILL and waits until it is gone.
func (c *BinaryCluster) Kill(i int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	m := c.members[i]
	if m.dead {
		return
	}
	m.dead = true
	_ = m.cmd.Process.Kill()
	<-m.exited
}

// Leader returns the index of the member the living members' first
// answer names as the leader.
func (c *BinaryCluster) Leader(ctx context.Context) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	ids := map[uint64]int{}
	var leader uint64
	for i, m := range c.members {
		if m.dead {
			continue
		}
		st, err := status(ctx, m.client)
		if err != nil {
			return -1, fmt.Errorf("etcd member %d: %w", i, err)
		}
		ids[st.Header.MemberId] = i
		if leader == 0 {
			leader = st.Leader
		}
	}
	i, ok := ids[leader]
	if !ok {
		return -1, fmt.Errorf("etcd: leader %x is no living member", leader)
	}
	return i, nil
}

// status asks the member at endpoint for its status.
func status(ctx context.Context, endpoint string) (*clientv3.StatusResponse, error) {
	cl, err := clientv3.New(clientv3.Config{Endpoints: []string{endpoint}, DialTimeout: 2 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		return nil, err
	}
	defer cl.Close()
	return cl.Status(ctx, endpoint)
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
