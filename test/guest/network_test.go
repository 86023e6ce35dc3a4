package guest

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestNetworkArgs(t *testing.T) {
	args := NetworkArgs(Forward{GuestPort: 10809, HostAddr: "127.0.0.1:4000"}, Forward{GuestPort: 80, HostAddr: "127.0.0.1:4001"})
	assert.Equal(t, []string{
		"-netdev", "user,id=net0,restrict=on,guestfwd=tcp:10.0.2.100:10809-cmd:nc 127.0.0.1 4000,guestfwd=tcp:10.0.2.100:80-cmd:nc 127.0.0.1 4001",
		"-device", "virtio-net-pci,netdev=net0,romfile=",
	}, args)
}
