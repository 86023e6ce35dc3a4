package guest

import (
	"fmt"
	"strings"
)

// GuestHostAddr is the address on the guest's network that stands for the
// host's services: guest connections to it are carried to the host by
// NetworkArgs' forwards.
const GuestHostAddr = "10.0.2.100"

// NetworkUpScript brings up the guest's network card for NetworkArgs: the
// guest needs the modules virtio_pci and virtio_net, and gets the address
// QEMU's user-mode network expects.
const NetworkUpScript = `ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
`

// Netcat is the host program that carries each forwarded connection (Debian
// package netcat-openbsd).
const Netcat = "nc"

// Forward carries guest connections to GuestHostAddr:GuestPort to a TCP
// address on the host.
type Forward struct {
	GuestPort int
	// HostAddr is "127.0.0.1:PORT", typically a test's own listener.
	HostAddr string
}

// NetworkArgs returns QEMU options for a virtio network card on a restricted
// user-mode network: the guest reaches nothing outside but the forwards.
// Every guest connection to a forward starts its own nc on the host, which
// connects to the forward's HostAddr; so a listener there sees one accepted
// connection per guest connection. (The "guestfwd=...-tcp:" form connects
// once when QEMU starts and does not serve several connections.)
func NetworkArgs(forwards ...Forward) []string {
	netdev := []string{"user", "id=net0", "restrict=on"}
	for _, f := range forwards {
		host, port, _ := strings.Cut(f.HostAddr, ":")
		netdev = append(netdev, fmt.Sprintf("guestfwd=tcp:%s:%d-cmd:%s %s %s", GuestHostAddr, f.GuestPort, Netcat, host, port))
	}
	return []string{"-netdev", strings.Join(netdev, ","), "-device", "virtio-net-pci,netdev=net0,romfile="}
}
