package guest

import (
	"context"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// DLMPackages are the Debian packages a DLM cluster guest runs: corosync
// 3 and dlm_controld 4, with the libraries of theirs that a minimal Debian
// host lacks (libnl included). The others (libc, libsystemd and what it
// loads) come from the host.
func DLMPackages() []string {
	return []string{
		"corosync", "dlm-controld",
		"libcorosync-common4", "libknet1", "libnozzle1", "libqb100", "libstatgrab10",
		"libcfg7", "libcmap4", "libcpg4", "libquorum5", "libvotequorum8",
		"libdlm3", "libdlmcontrol3", "libnl-3-200", "libnl-route-3-200",
	}
}

// dlmPrograms are the programs of DLMPackages a guest runs.
func dlmPrograms() []string {
	return []string{
		"/usr/sbin/corosync", "/usr/sbin/corosync-quorumtool", "/usr/sbin/corosync-cfgtool",
		"/usr/sbin/dlm_controld", "/usr/sbin/dlm_tool",
	}
}

// DLMModules are the kernel modules of a DLM cluster guest: its network
// cards and the DLM (with configfs, where dlm_controld configures it).
func DLMModules() []string { return []string{"virtio_pci", "virtio_net", "configfs", "dlm"} }

// DLMSetup is Setup for guests of a DLM cluster: cfg gets DLMModules and
// the programs of DLMPackages, from .deb files in DebsDir (downloaded there
// with apt-get download when missing; never installed on the host). When
// the packages can be neither found nor downloaded, it skips t with what to
// do, or fails it under CI=true.
func DLMSetup(t testing.TB, cfg Config) *Initramfs {
	t.Helper()
	dir, err := DebsDir()
	if err != nil {
		missing(t, "%v", err)
	}
	if err := FetchDebs(t.Context(), dir, DLMPackages()...); err != nil {
		missing(t, "%v: download them with `mkdir -p DIR && cd DIR && apt-get download %s` and set %s=DIR",
			err, strings.Join(DLMPackages(), " "), DebsEnv)
	}
	root := filepath.Join(t.TempDir(), "debs")
	if err := ExtractDebs(t.Context(), dir, root, DLMPackages()...); err != nil {
		t.Fatalf("%v", err)
	}
	files, err := RootFiles(t.Context(), root, dlmPrograms()...)
	if err != nil {
		t.Fatalf("%v", err)
	}
	if cfg.Files == nil {
		cfg.Files = map[string][]byte{}
	}
	for name, data := range files {
		if _, ok := cfg.Files[name]; !ok {
			cfg.Files[name] = data
		}
	}
	cfg.Modules = append(append([]string(nil), cfg.Modules...), DLMModules()...)
	return Setup(t, cfg)
}

// DLMClusterName is the corosync cluster name of a DLMCluster.
const DLMClusterName = "csnap"

// DLMReadyMarker is what guest i prints on its console once its
// corosync is quorate and its dlm_controld runs.
func DLMReadyMarker(i int) string { return fmt.Sprintf("@@dlm-ready node=%d@@", i) }

// DLMClusterOptions describe a DLMCluster.
type DLMClusterOptions struct {
	// Nodes is the number of guests, node ids 1..Nodes.
	Nodes int
	// Script runs on guest i once it is ready; when it ends, the guest
	// powers off.
	Script func(i int) string
	// QEMUArgs are guest i's extra QEMU options, e.g. NetworkArgs.
	QEMUArgs func(i int) []string
	// MemoryMiB is each guest's memory; 512 when zero.
	MemoryMiB int
	// Console, if set, receives guest i's console.
	Console func(i int) io.Writer
}

// DLMCluster is a cluster of guests on a Hub, each running corosync
// (totem over knet on the hub, no crypto, votequorum) and dlm_controld
// (TCP, fencing disabled), so that the kernel DLM spans them. Guest i has
// address HubSubnet+i and corosync node id i.
type DLMCluster struct {
	r    *Initramfs
	opts DLMClusterOptions
	hub  *Hub
	ctx  context.Context // the guests' lifetime

	mu       sync.Mutex
	machines []*Machine // by node id - 1
}

// bootSlots is how many guests boot at once: the machines have two CPUs.
const bootSlots = 2

// StartDLMCluster boots the guests, at most two booting at once, and
// waits until every one is ready. The guests live until ctx ends or Close.
func StartDLMCluster(ctx context.Context, r *Initramfs, opts DLMClusterOptions) (*DLMCluster, error) {
	hub, err := NewHub(opts.Nodes)
	if err != nil {
		return nil, err
	}
	c := &DLMCluster{r: r, opts: opts, hub: hub, ctx: ctx, machines: make([]*Machine, opts.Nodes)}
	slots := make(chan struct{}, bootSlots)
	errs := make(chan error, opts.Nodes)
	for i := 1; i <= opts.Nodes; i++ {
		slots <- struct{}{}
		m, err := c.start(i)
		if err != nil {
			<-slots
			c.Close()
			return nil, err
		}
		go func() {
			err := m.WaitBooted(ctx)
			<-slots
			if err == nil {
				err = m.WaitConsole(ctx, DLMReadyMarker(i))
			}
			errs <- err
		}()
	}
	var first error
	for range opts.Nodes {
		if err := <-errs; err != nil && first == nil {
			first = err
		}
	}
	if first != nil {
		c.Close()
		return nil, first
	}
	return c, nil
}

// start starts guest i's QEMU.
func (c *DLMCluster) start(i int) (*Machine, error) {
	// The caller's cards come first, so that a NetworkArgs card is eth0
	// as NetworkUpScript expects; the guest finds the hub's card by MAC.
	var args []string
	if c.opts.QEMUArgs != nil {
		args = append(args, c.opts.QEMUArgs(i)...)
	}
	args = append(args, c.hub.NICArgs(i)...)
	script := dlmNodeScript(i, c.opts.Nodes)
	if c.opts.Script != nil {
		script += c.opts.Script(i)
	}
	o := Options{Script: script, MemoryMiB: c.opts.MemoryMiB, QEMUArgs: args}
	if c.opts.Console != nil {
		o.Console = c.opts.Console(i)
	}
	m, err := c.r.Start(c.ctx, o)
	if err != nil {
		return nil, fmt.Errorf("cluster guest %d: %w", i, err)
	}
	c.mu.Lock()
	c.machines[i-1] = m
	c.mu.Unlock()
	return m, nil
}

// Nodes is the number of guests.
func (c *DLMCluster) Nodes() int { return c.opts.Nodes }

// Hub is the guests' network.
func (c *DLMCluster) Hub() *Hub { return c.hub }

// Machine returns guest i's current machine.
func (c *DLMCluster) Machine(i int) *Machine {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.machines[i-1]
}

// Kill ends guest i's QEMU at once (SIGKILL): to the others it is a node
// that lost power.
func (c *DLMCluster) Kill(i int) { c.Machine(i).Kill() }

// Reboot boots guest i again (after Kill, or after its script ended) and
// waits until it is ready: it has rejoined the cluster.
func (c *DLMCluster) Reboot(ctx context.Context, i int) error {
	if old := c.Machine(i); old != nil {
		old.Kill()
	}
	m, err := c.start(i)
	if err != nil {
		return err
	}
	return m.WaitConsole(ctx, DLMReadyMarker(i))
}

// Close kills every guest and stops the hub.
func (c *DLMCluster) Close() {
	c.mu.Lock()
	machines := append([]*Machine(nil), c.machines...)
	c.mu.Unlock()
	for _, m := range machines {
		if m != nil {
			m.Kill()
		}
	}
	c.hub.Close()
}

// dlmNodeScript prepares guest i of n: the file systems and device names
// corosync and dlm_controld expect without systemd and udev, the hub's
// network card, corosync, then dlm_controld once corosync answers; and it
// waits until the node is quorate before printing DLMReadyMarker. Neither
// daemon notifies readiness, so the script polls their status tools, each
// poll bounded.
func dlmNodeScript(i, n int) string {
	var nodes strings.Builder
	for j := 1; j <= n; j++ {
		fmt.Fprintf(&nodes, "  node {\n    ring0_addr: %s%d\n    name: node%d\n    nodeid: %d\n  }\n", HubSubnet, j, j, j)
	}
	return fmt.Sprintf(`export LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu:/lib/x86_64-linux-gnu
mkdir -p /dev/shm /var/lib/corosync /var/log/cluster /etc/corosync /etc/dlm /run/dlm /sys/kernel/config /sys/kernel/debug
[ -e /dev/misc ] || ln -s /dev /dev/misc
[ -e /var/run ] || ln -s /run /var/run
mount -t tmpfs tmpfs /dev/shm
mount -t configfs configfs /sys/kernel/config
mount -t debugfs debugfs /sys/kernel/debug
hostname node%[1]d
ip link set lo up
ifc=
for d in /sys/class/net/*; do
	[ "$(cat $d/address)" = "%[2]s" ] && ifc=${d##*/}
done
[ -n "$ifc" ] || { echo "dlm-node: no card with MAC %[2]s"; exit 1; }
ip link set "$ifc" up
ip addr add %[3]s%[1]d/24 dev "$ifc"
cat >/etc/corosync/corosync.conf <<'EOF'
totem {
  version: 2
  cluster_name: %[4]s
  transport: knet
  crypto_cipher: none
  crypto_hash: none
  token: 10000
}
nodelist {
%[5]s}
quorum {
  provider: corosync_votequorum
}
logging {
  to_stderr: no
  to_syslog: no
  to_logfile: yes
  logfile: /var/log/cluster/corosync.log
  timestamp: on
}
EOF
dlm_node_fail() {
	echo "dlm-node: $1"
	tail -n 40 /var/log/cluster/corosync.log /var/log/cluster/corosync.out /var/log/cluster/dlm_controld.log 2>/dev/null
	exit 1
}
corosync -f >/var/log/cluster/corosync.out 2>&1 &
# Membership changes on the console: a test that fails over a lost
# member then shows why corosync lost it.
tail -F /var/log/cluster/corosync.log 2>/dev/null | while read -r l; do echo "corosync: $l"; done &
t=0
until corosync-cfgtool -s >/dev/null 2>&1; do
	t=$((t + 1)); [ $t -le 600 ] || dlm_node_fail "corosync does not answer"
	sleep 0.2
done
dlm_controld --foreground --enable_fencing 0 --protocol tcp >/var/log/cluster/dlm_controld.log 2>&1 &
t=0
until corosync-quorumtool -s 2>/dev/null | grep -q '^Quorate: *Yes' && dlm_tool status 2>/dev/null | grep -q 'quorate 1'; do
	t=$((t + 1)); [ $t -le 900 ] || dlm_node_fail "not quorate"
	sleep 0.2
done
echo "%[6]s"
`, i, HubMAC(i), HubSubnet, DLMClusterName, nodes.String(), DLMReadyMarker(i))
}
