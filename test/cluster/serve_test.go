package cluster

import (
	"fmt"
	"net"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/test/clusterload"
)

const (
	nodes = clusterload.Nodes
	// nbdPort is where snapd listens in each guest.
	nbdPort = 10809
)

// servingMarker is what guest i prints once its snapd serves and the
// kernel lockspace snapd joined has every node as a member.
func servingMarker(i int) string { return fmt.Sprintf("@@snapd-serving node=%d@@", i) }

// statusMarker ends the n-th line (from 1) in which guest i prints its
// snapd's status (snapd status --control --json on one line), every 3 s
// while snapd serves: once it is on the console, so is the whole line.
func statusMarker(i, n int) string { return fmt.Sprintf("%s%d@@", statusPrefix(i), n) }

// recoveriesPrefix starts the line guest i prints before each status
// line: how many recoveries of snapd's lockspace its kernel has completed
// (it logs one when a member joins or leaves), then "@@".
func recoveriesPrefix(i int) string { return fmt.Sprintf("@@dlm-recoveries node=%d count=", i) }

// statusPrefix starts the marker that ends every status line of guest i.
func statusPrefix(i int) string { return fmt.Sprintf("@@snapd-status node=%d n=", i) }

// fwdMAC is guest i's MAC on its host-forwarding network card.
func fwdMAC(i int) string { return fmt.Sprintf("52:54:00:00:02:%02x", i) }

// freePort returns a loopback TCP port nobody listens on now.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// sharedDisks are the origin (/dev/vda) and COW (/dev/vdb) images as disks
// every guest writes at once: no image lock, shared writers, no host
// cache.
func sharedDisks(paths ...string) []string {
	var args []string
	for k, p := range paths {
		id := fmt.Sprintf("shared%d", k)
		args = append(args,
			"-drive", fmt.Sprintf("file=%s,format=raw,if=none,id=%s,cache=none,file.locking=off", p, id),
			"-device", fmt.Sprintf("virtio-blk-pci,drive=%s,share-rw=on", id))
	}
	return args
}

// forwardArgs give guest i a network card on a restricted user-mode
// network that forwards the host's 127.0.0.1:port to the guest's snapd.
func forwardArgs(i, port int) []string {
	return []string{
		"-netdev", fmt.Sprintf("user,id=fwd,restrict=on,hostfwd=tcp:127.0.0.1:%d-:%d", port, nbdPort),
		"-device", fmt.Sprintf("virtio-net-pci,netdev=fwd,mac=%s,romfile=", fwdMAC(i)),
	}
}

// serveScript runs on guest i once it is a quorate DLM member: it brings
// up the forwarding card, starts snapd on the shared disks and reports
// when it serves, then stays up while snapd runs, printing its status
// every 3 s (see statusMarker, recoveriesPrefix). Neither the disks'
// arrival nor snapd's start is announced other than by their effects, so
// it polls them, each poll bounded.
func serveScript(i int) string { return serveScriptThen(i, "") }

// serveScriptThen is serveScript with then run once snapd serves and
// every node is a member of its lockspace, before the status loop.
func serveScriptThen(i int, then string) string { return serveScriptAround(i, "", then) }

// serveScriptAround is serveScriptThen with before run once the
// forwarding card is up and the shared disks are there, before snapd
// starts.
func serveScriptAround(i int, before, then string) string {
	return serveScriptWith(i, "", before, then)
}

// serveScriptWith is serveScriptAround with flags added to snapd serve's.
func serveScriptWith(i int, flags, before, then string) string {
	return fmt.Sprintf(`ifc=
for d in /sys/class/net/*; do
	[ "$(cat $d/address)" = "%[2]s" ] && ifc=${d##*/}
done
[ -n "$ifc" ] || { echo "no card with MAC %[2]s"; exit 1; }
ip link set "$ifc" up
ip addr add 10.0.2.15/24 dev "$ifc"
t=0
until [ -b /dev/vda ] && [ -b /dev/vdb ]; do
	t=$((t + 1)); [ $t -le 300 ] || { echo "the shared disks did not appear"; exit 1; }
	sleep 0.1
done
%[7]s
snapd serve --origin /dev/vda --snapshot snap=/dev/vdb --cluster-id c1 --lock dlm --listen 0.0.0.0:%[3]d --control /run/snapd.ctl%[8]s >/tmp/snapd.log 2>&1 &
pid=$!
t=0
until grep -q '^serving:' /tmp/snapd.log; do
	kill -0 $pid 2>/dev/null || { cat /tmp/snapd.log; echo "snapd exited"; exit 1; }
	t=$((t + 1)); [ $t -le 600 ] || { cat /tmp/snapd.log; echo "snapd does not serve"; exit 1; }
	sleep 0.2
done
t=0
until dlm_tool ls 2>/dev/null | grep -A 8 '^name *clustersnap' | grep -q 'members *1 2 3'; do
	kill -0 $pid 2>/dev/null || { cat /tmp/snapd.log; echo "snapd exited"; exit 1; }
	t=$((t + 1)); [ $t -le 600 ] || { dlm_tool ls; echo "the lockspace does not span the nodes"; exit 1; }
	sleep 0.2
done
echo "%[1]s"
%[5]s
n=0
while kill -0 $pid 2>/dev/null; do
	sleep 3
	s=$(snapd status --control /run/snapd.ctl --json 2>&1 | tr -d '\n\t')
	n=$((n + 1))
	r=$(dmesg | grep -c 'dlm: clustersnap: dlm_recover .* done')
	echo "%[6]s$r@@"
	echo "$s %[4]s$n@@"
done
wait $pid
echo "snapd exited with $?"
cat /tmp/snapd.log
`, servingMarker(i), fwdMAC(i), nbdPort, statusPrefix(i), then, recoveriesPrefix(i), before, flags)
}
