package guest

import (
	"net"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// hubGuest binds guest i's socket on h, as QEMU's dgram backend would.
func hubGuest(t *testing.T, h *Hub, i int) *net.UnixConn {
	t.Helper()
	os.Remove(h.guestSocket(i))
	c, err := net.DialUnix("unixgram",
		&net.UnixAddr{Name: h.guestSocket(i), Net: "unixgram"},
		&net.UnixAddr{Name: h.dir + "/hub.sock", Net: "unixgram"})
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return c
}

// receive reads one frame; the deadline only bounds a hub that lost it.
func receive(t *testing.T, c *net.UnixConn) string {
	t.Helper()
	require.NoError(t, c.SetReadDeadline(time.Now().Add(10*time.Second)))
	b := make([]byte, 100)
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
	g := []*net.UnixConn{nil, hubGuest(t, h, 1), hubGuest(t, h, 2), hubGuest(t, h, 3)}

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
}
