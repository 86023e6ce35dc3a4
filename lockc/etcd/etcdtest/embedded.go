package etcdtest

import (
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"

	"github.com/clustersnap/clustersnap/internal/testpki"
)

// startBound bounds how long a cluster may take to elect a leader.
const startBound = 60 * time.Second

// Cluster is a running etcd cluster.
type Cluster struct {
	tb      testing.TB
	dir     string
	mu      sync.Mutex
	members []*member
}

// member is one embedded etcd server.
type member struct {
	name    string
	client  url.URL
	peer    url.URL
	dir     string
	srv     *embed.Etcd
	stopped bool
}

// Start starts an embedded etcd cluster of n members and waits until it
// has a leader. It is stopped at tb's cleanup.
func Start(tb testing.TB, n int) *Cluster {
	tb.Helper()
	return start(tb, n, nil)
}

// StartTLS starts a one-member embedded etcd whose clients connect over
// TLS on 127.0.0.1 (an https:// endpoint), as etcd's --cert-file,
// --key-file, --trusted-ca-file and --client-cert-auth set it up: the
// member presents pki's server certificate and accepts only clients that
// present a certificate signed by pki's CA. It is stopped at tb's cleanup.
func StartTLS(tb testing.TB, pki *testpki.PKI) *Cluster {
	tb.Helper()
	return start(tb, 1, pki)
}

// start starts n members; with pki, their clients use TLS on loopback TCP,
// else unix sockets.
func start(tb testing.TB, n int, pki *testpki.PKI) *Cluster {
	// Unix socket paths must be short (108 bytes), so not t.TempDir.
	dir, err := os.MkdirTemp("", "etcd")
	if err != nil {
		tb.Fatal(err)
	}
	c := &Cluster{tb: tb, dir: dir}
	tb.Cleanup(func() {
		c.stopAll()
		os.RemoveAll(dir)
	})
	var initial []string
	for i := range n {
		m := &member{name: fmt.Sprintf("m%d", i+1), dir: filepath.Join(dir, fmt.Sprintf("m%d", i+1))}
		m.client = url.URL{Scheme: "unix", Path: filepath.Join(dir, m.name+".c")}
		if pki != nil {
			// Port 0: the member listens on a port the kernel picks,
			// read back once it listens.
			m.client = url.URL{Scheme: "https", Host: "127.0.0.1:0"}
		}
		// Members talk to each other over loopback TCP: etcd's peer
		// transport takes a unix URL's host, not its path, as the socket.
		m.peer = url.URL{Scheme: "http", Host: fmt.Sprintf("127.0.0.1:%d", freePort(tb))}
		c.members = append(c.members, m)
		initial = append(initial, m.name+"="+m.peer.String())
	}
	for _, m := range c.members {
		cfg := embed.NewConfig()
		cfg.Name = m.name
		cfg.Dir = m.dir
		cfg.ListenClientUrls = []url.URL{m.client}
		cfg.AdvertiseClientUrls = []url.URL{m.client}
		cfg.ListenPeerUrls = []url.URL{m.peer}
		cfg.AdvertisePeerUrls = []url.URL{m.peer}
		cfg.InitialCluster = strings.Join(initial, ",")
		cfg.InitialClusterToken = filepath.Base(dir)
		cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
		// No metrics or debug listeners beyond the client socket.
		cfg.ListenMetricsUrls = nil
		if pki != nil {
			cfg.ClientTLSInfo = transport.TLSInfo{
				CertFile:       pki.ServerCert(),
				KeyFile:        pki.ServerKey(),
				TrustedCAFile:  pki.CACert(),
				ClientCertAuth: true,
			}
			// The HTTP gateway would dial the listener's configured
			// address, port 0; clients of these tests speak gRPC.
			cfg.EnableGRPCGateway = false
		}
		srv, err := embed.StartEtcd(cfg)
		if err != nil {
			tb.Fatalf("etcd member %s: %v", m.name, err)
		}
		m.srv = srv
		if pki != nil {
			m.client.Host = srv.Clients[0].Addr().String()
		}
	}
	timeout := time.After(startBound)
	for _, m := range c.members {
		select {
		case <-m.srv.Server.ReadyNotify():
		case err := <-m.srv.Err():
			tb.Fatalf("etcd member %s: %v", m.name, err)
		case <-timeout:
			tb.Fatalf("etcd member %s: not ready after %v", m.name, startBound)
		}
	}
	return c
}

// Endpoints returns the client URLs of the members (stopped ones too: a
// client fails over from them).
func (c *Cluster) Endpoints() []string {
	var eps []string
	for _, m := range c.members {
		eps = append(eps, m.client.String())
	}
	return eps
}

// Endpoint returns member i's client URL (members from 0).
func (c *Cluster) Endpoint(i int) string { return c.members[i].client.String() }

// Revision returns member i's current revision (members from 0): it grows
// by one with every committed write or transaction that changed a key, so
// the difference between two readings counts them (lease keep-alives
// change no key).
func (c *Cluster) Revision(i int) int64 { return c.members[i].srv.Server.KV().Rev() }

// Stop stops member i (from 0): the others go on if they keep a quorum.
func (c *Cluster) Stop(i int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	m := c.members[i]
	if m.stopped {
		return
	}
	m.stopped = true
	m.srv.Close()
}

func (c *Cluster) stopAll() {
	for i := range c.members {
		c.Stop(i)
	}
}
