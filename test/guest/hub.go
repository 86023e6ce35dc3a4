package guest

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
)

// Hub is a guest-only Ethernet segment: one AF_UNIX datagram socket that
// QEMU's "dgram" network backends of several guests send their frames to,
// and that floods every frame to the other guests. No frame enters the
// host's network stack. Cutting a guest off drops every frame it sends or
// would receive, which partitions it from the others.
//
// Each guest has a port: a queue of frames and a socket of its own that
// sends them to the guest's socket, so that a guest that does not read
// (its card not yet up while it boots, or its QEMU starved of CPU) holds
// up only its own frames. Were the hub to send on its one socket and wait,
// such a guest would stall every other guest's traffic, long enough for
// corosync on the running guests to lose each other. A port whose queue
// is full drops the frame, as a switch does for a port that does not
// drain.
type Hub struct {
	dir   string
	conn  *net.UnixConn
	done  chan struct{}
	ports []*hubPort // by guest, [0] unused
	wg    sync.WaitGroup

	mu     sync.Mutex
	cut    map[int]bool
	closed bool
	n      int // guests 1..n
}

// hubPortFrames is how many frames a port queues for a guest that does not
// read, beyond what its socket holds.
const hubPortFrames = 256

// hubPort sends the frames for one guest.
type hubPort struct {
	frames chan []byte

	mu   sync.Mutex
	conn *net.UnixConn // to the guest's socket; nil until dialled, or after an error
}

// HubSubnet is the guests' network on a Hub: guest N is HubSubnet + N.
const HubSubnet = "192.168.100."

// NewHub makes a hub for guests 1..n in a new directory of its own (unix
// socket paths must be short, so not under a test's temporary directory).
func NewHub(n int) (*Hub, error) {
	dir, err := os.MkdirTemp("", "hub")
	if err != nil {
		return nil, fmt.Errorf("hub: %w", err)
	}
	addr := &net.UnixAddr{Name: filepath.Join(dir, "hub.sock"), Net: "unixgram"}
	conn, err := net.ListenUnixgram("unixgram", addr)
	if err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("hub %s: %w", addr.Name, err)
	}
	h := &Hub{dir: dir, conn: conn, done: make(chan struct{}), ports: make([]*hubPort, n+1), cut: map[int]bool{}, n: n}
	for i := 1; i <= n; i++ {
		h.ports[i] = &hubPort{frames: make(chan []byte, hubPortFrames)}
		h.wg.Go(func() { h.drain(i) })
	}
	go h.forward()
	return h, nil
}

// guestSocket is where guest i's QEMU receives frames.
func (h *Hub) guestSocket(i int) string { return filepath.Join(h.dir, "g"+strconv.Itoa(i)+".sock") }

// NICArgs returns the QEMU options for guest i's network card on the hub,
// with the MAC address HubMAC(i).
func (h *Hub) NICArgs(i int) []string {
	// QEMU binds the local path itself; a stale one from a killed guest
	// would make it fail.
	os.Remove(h.guestSocket(i))
	netdev := fmt.Sprintf("dgram,id=hub0,local.type=unix,local.path=%s,remote.type=unix,remote.path=%s",
		h.guestSocket(i), filepath.Join(h.dir, "hub.sock"))
	return []string{"-netdev", netdev, "-device", "virtio-net-pci,netdev=hub0,mac=" + HubMAC(i) + ",romfile="}
}

// HubMAC is guest i's MAC address on a hub, by which the guest finds its
// card.
func HubMAC(i int) string { return fmt.Sprintf("52:54:00:00:01:%02x", i) }

// Cut drops every frame from and to guest i while cut is true.
func (h *Hub) Cut(i int, cut bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.cut[i] = cut
}

// forward floods each frame to every other guest, until Close.
func (h *Hub) forward() {
	defer close(h.done)
	buf := make([]byte, 65536)
	for {
		n, from, err := h.conn.ReadFromUnix(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		src := h.guestOf(from)
		h.mu.Lock()
		drop := src == 0 || h.cut[src]
		var to []int
		for i := 1; i <= h.n && !drop; i++ {
			if i != src && !h.cut[i] {
				to = append(to, i)
			}
		}
		h.mu.Unlock()
		for _, i := range to {
			select {
			case h.ports[i].frames <- bytes.Clone(buf[:n]):
			default: // the port is full: dropped
			}
		}
	}
}

// drain sends the frames queued for guest i to its socket, until Close. A
// guest that is not running has no socket: its frames are lost, as on a
// wire to a powered-off machine. A guest that boots again binds a new
// socket at the same path, which the port dials at its next frame.
func (h *Hub) drain(i int) {
	p := h.ports[i]
	for frame := range p.frames {
		c := h.portConn(p, i)
		if c == nil {
			continue
		}
		// A send blocks while the guest's socket is full.
		if _, err := c.Write(frame); err != nil {
			p.mu.Lock()
			if p.conn == c {
				p.conn = nil
			}
			p.mu.Unlock()
			c.Close()
		}
	}
}

// portConn returns p's socket to guest i, dialling it if need be; nil if
// the guest has no socket or the hub is closed.
func (h *Hub) portConn(p *hubPort, i int) *net.UnixConn {
	// Under p.mu: Close, once it set closed, closes what is dialled here.
	p.mu.Lock()
	defer p.mu.Unlock()
	h.mu.Lock()
	closed := h.closed
	h.mu.Unlock()
	if closed {
		return nil
	}
	if p.conn == nil {
		c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: h.guestSocket(i), Net: "unixgram"})
		if err != nil {
			return nil
		}
		p.conn = c
	}
	return p.conn
}

// guestOf names the guest a frame came from, 0 if none of the hub's.
func (h *Hub) guestOf(from *net.UnixAddr) int {
	if from == nil {
		return 0
	}
	base := filepath.Base(from.Name)
	if !strings.HasPrefix(base, "g") || !strings.HasSuffix(base, ".sock") {
		return 0
	}
	i, err := strconv.Atoi(strings.TrimSuffix(strings.TrimPrefix(base, "g"), ".sock"))
	if err != nil || i < 1 || i > h.n {
		return 0
	}
	return i
}

// Close stops the hub and removes its directory; a second Close does
// nothing.
func (h *Hub) Close() error {
	h.mu.Lock()
	closed := h.closed
	h.closed = true
	h.mu.Unlock()
	if closed {
		return nil
	}
	err := h.conn.Close()
	<-h.done
	for _, p := range h.ports[1:] {
		close(p.frames)
		p.mu.Lock()
		if p.conn != nil {
			p.conn.Close() // ends a send blocked on a guest that does not read
		}
		p.mu.Unlock()
	}
	h.wg.Wait()
	os.RemoveAll(h.dir)
	return err
}
