package etcdtest

import (
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// quiet is how long a read waits to show that nothing arrives.
const quiet = 200 * time.Millisecond

// echoServer answers every connection on a unix socket with what it reads.
func echoServer(t *testing.T) string {
	dir, err := os.MkdirTemp("", "echo")
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("unix", filepath.Join(dir, "e"))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	t.Cleanup(func() {
		ln.Close()
		<-done
		os.RemoveAll(dir)
	})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				io.Copy(c, c)
			}()
		}
	}()
	return "unix://" + ln.Addr().String()
}

func dialProxy(t *testing.T, p *Proxy) net.Conn {
	c, err := net.Dial("unix", p.ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// roundTrip sends msg and reads it back within bound.
func roundTrip(t *testing.T, c net.Conn, msg string, bound time.Duration) {
	t.Helper()
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatal(err)
	}
	expectEcho(t, c, msg, bound)
}

func expectEcho(t *testing.T, c net.Conn, msg string, bound time.Duration) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(bound))
	b := make([]byte, len(msg))
	if _, err := io.ReadFull(c, b); err != nil {
		t.Fatalf("echo of %q: %v", msg, err)
	}
	if string(b) != msg {
		t.Fatalf("echo: got %q, want %q", b, msg)
	}
}

// expectSilence shows that nothing arrives on c for a while and that c is
// still open.
func expectSilence(t *testing.T, c net.Conn) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(quiet))
	n, err := c.Read(make([]byte, 1))
	if n != 0 || !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("cut proxy: read %d bytes, %v; want a timeout on an open connection", n, err)
	}
}

// A cut proxy holds bytes on open connections, new ones included, and
// delivers them in order when healed; closing it closes the connections.
func TestProxyCutHoldsAndHealDelivers(t *testing.T) {
	p := NewProxy(t, echoServer(t))
	c := dialProxy(t, p)
	roundTrip(t, c, "before", 10*time.Second)

	p.Cut()
	if _, err := c.Write([]byte("held-")); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write([]byte("in-order")); err != nil {
		t.Fatal(err)
	}
	expectSilence(t, c)
	late := dialProxy(t, p)
	if _, err := late.Write([]byte("new")); err != nil {
		t.Fatal(err)
	}
	expectSilence(t, late)

	p.Heal()
	expectEcho(t, c, "held-in-order", 10*time.Second)
	expectEcho(t, late, "new", 10*time.Second)
	roundTrip(t, c, "after", 10*time.Second)

	p.Close()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if n, err := c.Read(make([]byte, 1)); n != 0 || !errors.Is(err, io.EOF) {
		t.Fatalf("closed proxy: read %d bytes, %v; want EOF", n, err)
	}
}

// A delayed proxy passes bytes on no sooner than the delay, each way.
func TestProxyDelay(t *testing.T) {
	p := NewProxy(t, echoServer(t))
	c := dialProxy(t, p)
	const d = 150 * time.Millisecond
	p.SetDelay(d)
	start := time.Now()
	roundTrip(t, c, "slow", 10*time.Second)
	if rtt := time.Since(start); rtt < 2*d {
		t.Fatalf("round trip took %v through a proxy that delays each way by %v", rtt, d)
	}
	p.SetDelay(0)
	roundTrip(t, c, "fast", 10*time.Second)
}
