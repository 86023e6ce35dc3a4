package guest

import (
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
type Hub struct {
	dir  string
	conn *net.UnixConn
	done chan struct{}

	mu  sync.Mutex
	cut map[int]bool
	n   int // guests 1..n
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
	h := &Hub{dir: dir, conn: conn, done: make(chan struct{}), cut: map[int]bool{}, n: n}
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
			// A guest that is not running has no socket: its frames are
			// lost, as on a wire to a powered-off machine.
			_, _ = h.conn.WriteToUnix(buf[:n], &net.UnixAddr{Name: h.guestSocket(i), Net: "unixgram"})
		}
	}
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

// Close stops the hub and removes its directory.
func (h *Hub) Close() error {
	err := h.conn.Close()
	<-h.done
	os.RemoveAll(h.dir)
	return err
}
