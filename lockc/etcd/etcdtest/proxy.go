package etcdtest

import (
	"errors"
	"io"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// Proxy forwards connections from a unix socket of its own to one etcd
// endpoint, and can stand for a network that fails between a client and
// etcd:
//
//   - Cut freezes every connection, as a partition does: bytes sent either
//     way are held, nothing is closed, no error reaches either side, and new
//     connections are accepted but frozen too. Heal delivers what was held,
//     in order, and forwards again.
//   - SetDelay holds every chunk of bytes for a while before passing it on
//     (each direction keeps its order), as a slow network does.
//   - Reset closes every connection, as a failed path does; clients
//     reconnect.
//
// A client that dials the Proxy's Endpoint instead of etcd's is the node
// whose connection fails; other clients dial etcd directly. The Proxy is
// closed at the test's cleanup.
type Proxy struct {
	tb     testing.TB
	dir    string
	ln     net.Listener
	target func() (net.Conn, error)

	mu     sync.Mutex
	cut    bool
	healed chan struct{} // closed by Heal; replaced by Cut
	delay  time.Duration
	conns  map[net.Conn]struct{}

	closed chan struct{}
	wg     sync.WaitGroup
}

// proxyQueue is how many chunks a direction holds before it stops reading
// (and the sender's writes block, as a full window would).
const proxyQueue = 256

// NewProxy starts a proxy to endpoint, an etcd client URL (unix://path or
// http://127.0.0.1:port).
func NewProxy(tb testing.TB, endpoint string) *Proxy {
	tb.Helper()
	u, err := url.Parse(endpoint)
	if err != nil {
		tb.Fatalf("proxy to %s: %v", endpoint, err)
	}
	var network, addr string
	switch u.Scheme {
	case "unix", "unixs":
		network, addr = "unix", u.Host+u.Path
	case "http":
		network, addr = "tcp", u.Host
	default:
		tb.Fatalf("proxy to %s: scheme %q: want unix or http", endpoint, u.Scheme)
	}
	// Unix socket paths must be short (108 bytes), so not t.TempDir.
	dir, err := os.MkdirTemp("", "etcdproxy")
	if err != nil {
		tb.Fatal(err)
	}
	ln, err := net.Listen("unix", filepath.Join(dir, "p"))
	if err != nil {
		os.RemoveAll(dir)
		tb.Fatalf("proxy to %s: %v", endpoint, err)
	}
	healed := make(chan struct{})
	close(healed)
	p := &Proxy{
		tb: tb, dir: dir, ln: ln,
		target: func() (net.Conn, error) { return net.DialTimeout(network, addr, startBound) },
		healed: healed, conns: map[net.Conn]struct{}{}, closed: make(chan struct{}),
	}
	tb.Cleanup(p.Close)
	p.wg.Add(1)
	go p.accept()
	return p
}

// Endpoint is the URL clients dial to reach etcd through the proxy.
func (p *Proxy) Endpoint() string {
	return (&url.URL{Scheme: "unix", Path: p.ln.Addr().String()}).String()
}

// Cut stops forwarding: connections stay open, and what is sent on them
// is held until Heal.
func (p *Proxy) Cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.cut {
		p.cut = true
		p.healed = make(chan struct{})
	}
}

// Heal forwards again, first what was held since Cut.
func (p *Proxy) Heal() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cut {
		p.cut = false
		close(p.healed)
	}
}

// SetDelay has every chunk of bytes read from now on passed on d after it
// was read (0: at once).
func (p *Proxy) SetDelay(d time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.delay = d
}

// Reset closes every connection through the proxy, on both sides, and
// drops what it held, as a failed network path does; the proxy goes on
// accepting (and, unless cut, forwarding) new connections, so a client
// reconnects.
func (p *Proxy) Reset() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for c := range p.conns {
		c.Close()
	}
	clear(p.conns)
}

// Close stops the proxy and closes every connection through it, on both
// sides; what it held is dropped.
func (p *Proxy) Close() {
	p.mu.Lock()
	select {
	case <-p.closed:
		p.mu.Unlock()
		return
	default:
	}
	close(p.closed)
	p.ln.Close()
	for c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
	os.RemoveAll(p.dir)
}

// accept takes connections until the proxy is closed.
func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			select {
			case <-p.closed:
			default:
				p.tb.Errorf("proxy: accept: %v", err)
			}
			return
		}
		t, err := p.target()
		if err != nil {
			p.tb.Logf("proxy: dial etcd: %v", err)
			c.Close()
			continue
		}
		if !p.track(c, t) {
			return
		}
		p.wg.Add(4)
		go p.forward(c, t)
		go p.forward(t, c)
	}
}

// track records the connections of a pair so that Close closes them, or
// closes them and reports false if the proxy is closed.
func (p *Proxy) track(cs ...net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-p.closed:
		for _, c := range cs {
			c.Close()
		}
		return false
	default:
	}
	for _, c := range cs {
		p.conns[c] = struct{}{}
	}
	return true
}

// chunk is bytes read from one side, and when.
type chunk struct {
	b  []byte
	at time.Time
}

// forward copies src to dst through a queue, so that reading goes on while
// writing waits for a cut to heal or a delay to pass. When src ends, what
// was queued is passed on and both connections are closed.
func (p *Proxy) forward(src, dst net.Conn) {
	q := make(chan chunk, proxyQueue)
	go func() {
		defer p.wg.Done()
		defer close(q)
		for {
			b := make([]byte, 32<<10)
			n, err := src.Read(b)
			if n > 0 {
				select {
				case q <- chunk{b[:n], time.Now()}:
				case <-p.closed:
					return
				}
			}
			if err != nil {
				if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
					p.tb.Logf("proxy: read: %v", err)
				}
				return
			}
		}
	}()
	defer p.wg.Done()
	defer func() {
		src.Close()
		dst.Close()
		for range q { // until the reader sees src closed
		}
	}()
	for c := range q {
		if !p.wait(c.at) {
			return
		}
		if _, err := dst.Write(c.b); err != nil {
			return
		}
	}
}

// wait blocks while the proxy is cut and until the delay after at has
// passed; false means the proxy was closed.
func (p *Proxy) wait(at time.Time) bool {
	for {
		p.mu.Lock()
		cut, healed, delay := p.cut, p.healed, p.delay
		p.mu.Unlock()
		if cut {
			select {
			case <-healed:
				continue
			case <-p.closed:
				return false
			}
		}
		d := time.Until(at.Add(delay))
		if d <= 0 {
			return true
		}
		t := time.NewTimer(d)
		select {
		case <-t.C:
		case <-p.closed:
			t.Stop()
			return false
		}
		t.Stop()
	}
}
