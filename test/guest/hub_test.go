package guest

import (
	"fmt"
	"net"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// hubGuest is guest i's socket on h as QEMU's dgram backend makes it:
// bound to the guest's path, not connected, sending to the hub's.
type hubGuest struct {
	*net.UnixConn
	hub *net.UnixAddr
}

func newHubGuest(t *testing.T, h *Hub, i int) hubGuest {
	t.Helper()
	os.Remove(h.guestSocket(i))
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: h.guestSocket(i), Net: "unixgram"})
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return hubGuest{c, &net.UnixAddr{Name: h.dir + "/hub.sock", Net: "unixgram"}}
}

// Write sends a frame to the hub.
func (g hubGuest) Write(b []byte) (int, error) { return g.WriteToUnix(b, g.hub) }

// receive reads one frame; the deadline only bounds a hub that lost it.
func receive(t *testing.T, c hubGuest) string {
	t.Helper()
	require.NoError(t, c.SetReadDeadline(time.Now().Add(10*time.Second)))
	b := make([]byte, 2000)
	n, err := c.Read(b)
	require.NoError(t, err)
	return string(b[:n])
}

// TestHub: a frame reaches every other guest and not its sender; a cut-off
// guest's frames and the frames meant for it are dropped until it is
// reconnected.
func TestHub(t *testing.T) {
	h, err := NewHub(3)
	require.NoError(t, err)
	defer h.Close()
	g := []hubGuest{{}, newHubGuest(t, h, 1), newHubGuest(t, h, 2), newHubGuest(t, h, 3)}

	_, err = g[1].Write([]byte("from 1"))
	require.NoError(t, err)
	assert.Equal(t, "from 1", receive(t, g[2]))
	assert.Equal(t, "from 1", receive(t, g[3]))

	h.Cut(3, true)
	_, err = g[3].Write([]byte("from cut-off 3"))
	require.NoError(t, err)
	_, err = g[1].Write([]byte("to 2 only"))
	require.NoError(t, err)
	assert.Equal(t, "to 2 only", receive(t, g[2]), "guest 3's frame was dropped")
	h.Cut(3, false)
	_, err = g[2].Write([]byte("from 2"))
	require.NoError(t, err)
	assert.Equal(t, "from 2", receive(t, g[1]))
	assert.Equal(t, "from 2", receive(t, g[3]), "the frame sent while cut off never arrived")
	_, err = g[1].Write([]byte("from 1 again"))
	require.NoError(t, err)
	assert.Equal(t, "from 1 again", receive(t, g[2]), "guest 2's own frame did not come back to it")
	require.NoError(t, h.Close())
	require.NoError(t, h.Close(), "a second Close")
}

// TestHubDropsForStalledGuest: a guest that never reads its socket (a
// booting guest whose card is not up) holds up only its own frames, and
// loses those its socket and its port cannot hold; the other guests go on
// receiving every frame.
func TestHubDropsForStalledGuest(t *testing.T) {
	h, err := NewHub(3)
	require.NoError(t, err)
	defer h.Close()
	g := []hubGuest{{}, newHubGuest(t, h, 1), newHubGuest(t, h, 2), newHubGuest(t, h, 3)}
	// Far more frames than guest 3's socket and port hold; guest 2
	// reads each before the next is sent.
	const frames = 5000
	for k := range frames {
		_, err := g[1].Write([]byte(fmt.Sprint(k)))
		require.NoError(t, err, "frame %d", k)
		require.Equal(t, fmt.Sprint(k), receive(t, g[2]), "frame %d to guest 2", k)
	}
	// Guest 3 reads at last: what was kept for it, in order, then new
	// frames again. A probe is sent before each read: those sent while
	// the port is still full are dropped too, and each read makes room.
	held, last := 0, -1
	for {
		_, err = g[1].Write([]byte("probe"))
		require.NoError(t, err)
		got := receive(t, g[3])
		if got == "probe" {
			break
		}
		k, err := strconv.Atoi(got)
		require.NoError(t, err)
		require.Greater(t, k, last, "frames to guest 3 out of order")
		last = k
		held++
	}
	t.Logf("guest 3 got %d of %d frames sent while it did not read", held, frames)
	assert.Less(t, held, frames, "nothing was dropped for guest 3")
}
