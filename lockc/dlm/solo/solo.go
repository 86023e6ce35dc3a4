package solo

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// Where the kernel DLM is configured and controlled.
const (
	configfsCluster = "/sys/kernel/config/dlm/cluster"
	sysfsDLM        = "/sys/kernel/dlm"
)

// Controller answers one kernel's lockspace joins and leaves.
type Controller struct {
	nodeID uint32
	sock   *os.File

	mu  sync.Mutex
	err error // the first error handling an event

	done chan struct{}
}

// Start configures node nodeID as the kernel's local node (if configfs has
// no local node yet) and starts answering lockspace uevents. configfs must
// be mounted at /sys/kernel/config and the dlm module loaded.
func Start(nodeID uint32) (*Controller, error) {
	if nodeID == 0 {
		return nil, errors.New("solo: node id 0 is not a node")
	}
	if err := configureNode(nodeID); err != nil {
		return nil, err
	}
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, unix.NETLINK_KOBJECT_UEVENT)
	if err != nil {
		return nil, fmt.Errorf("solo: uevent socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: 1}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("solo: bind uevent socket: %w", err)
	}
	c := &Controller{
		nodeID: nodeID,
		sock:   os.NewFile(uintptr(fd), "uevent"),
		done:   make(chan struct{}),
	}
	go c.serve()
	return c, nil
}

// NodeID is the local node's id.
func (c *Controller) NodeID() uint32 { return c.nodeID }

// Err returns the first error met while answering an event.
func (c *Controller) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Close stops answering events.
func (c *Controller) Close() error {
	err := c.sock.Close()
	<-c.done
	return err
}

// StopLockspace stops lockspace ls (control=0), as a controller does for
// recovery: the kernel blocks its requests until ResumeLockspace.
func StopLockspace(ls string) error {
	return writeFile(filepath.Join(sysfsDLM, ls, "control"), "0")
}

// ResumeLockspace starts lockspace ls again (control=1) after
// StopLockspace; the kernel recovers it with the members configfs lists.
func ResumeLockspace(ls string) error {
	return writeFile(filepath.Join(sysfsDLM, ls, "control"), "1")
}

// serve reads uevents until the socket is closed.
func (c *Controller) serve() {
	defer close(c.done)
	buf := make([]byte, 8192)
	for {
		n, err := c.sock.Read(buf)
		if err != nil {
			if !errors.Is(err, os.ErrClosed) {
				c.fail(fmt.Errorf("solo: read uevent: %w", err))
			}
			return
		}
		action, ls, ok := parseUevent(buf[:n])
		if !ok {
			continue
		}
		switch action {
		case "online":
			c.fail(c.join(ls))
		case "offline":
			c.fail(c.leave(ls))
		}
	}
}

// fail records err if it is the first.
func (c *Controller) fail(err error) {
	if err == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err == nil {
		c.err = err
	}
}

// parseUevent returns the action and lockspace of a DLM uevent: a header
// "action@devpath" and NUL-separated KEY=value pairs.
func parseUevent(b []byte) (action, ls string, ok bool) {
	fields := bytes.Split(b, []byte{0})
	env := map[string]string{}
	for _, f := range fields[1:] {
		if k, v, found := strings.Cut(string(f), "="); found {
			env[k] = v
		}
	}
	if env["SUBSYSTEM"] != "dlm" || env["LOCKSPACE"] == "" {
		return "", "", false
	}
	return env["ACTION"], env["LOCKSPACE"], true
}

// join completes the kernel's join of ls with this node as its only
// member.
func (c *Controller) join(ls string) error {
	nodeDir := filepath.Join(configfsCluster, "spaces", ls, "nodes", strconv.FormatUint(uint64(c.nodeID), 10))
	if err := mkdirs(filepath.Join(configfsCluster, "spaces", ls), filepath.Join(configfsCluster, "spaces", ls, "nodes"), nodeDir); err != nil {
		return fmt.Errorf("solo: join %s: %w", ls, err)
	}
	id := crc32.ChecksumIEEE([]byte(ls))
	steps := [][2]string{
		{filepath.Join(nodeDir, "nodeid"), strconv.FormatUint(uint64(c.nodeID), 10)},
		{filepath.Join(sysfsDLM, ls, "id"), strconv.FormatUint(uint64(id), 10)},
		{filepath.Join(sysfsDLM, ls, "control"), "1"},
		{filepath.Join(sysfsDLM, ls, "event_done"), "0"},
	}
	for _, s := range steps {
		if err := writeFile(s[0], s[1]); err != nil {
			return fmt.Errorf("solo: join %s: %w", ls, err)
		}
	}
	return nil
}

// leave completes the kernel's leave of ls and removes its configfs
// directory.
func (c *Controller) leave(ls string) error {
	if err := writeFile(filepath.Join(sysfsDLM, ls, "event_done"), "0"); err != nil {
		return fmt.Errorf("solo: leave %s: %w", ls, err)
	}
	space := filepath.Join(configfsCluster, "spaces", ls)
	nodeDir := filepath.Join(space, "nodes", strconv.FormatUint(uint64(c.nodeID), 10))
	for _, d := range []string{nodeDir, space} {
		if err := unix.Rmdir(d); err != nil && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("solo: leave %s: rmdir %s: %w", ls, d, err)
		}
	}
	return nil
}

// configureNode makes the cluster directory and the local node's comms
// entry, unless configfs has a local node already.
func configureNode(nodeID uint32) error {
	comms := filepath.Join(configfsCluster, "comms")
	if err := mkdirs(configfsCluster); err != nil {
		return fmt.Errorf("solo: %w (is configfs mounted and dlm loaded?)", err)
	}
	entries, err := os.ReadDir(comms)
	if err != nil {
		return fmt.Errorf("solo: %w", err)
	}
	for _, e := range entries {
		if local, err := os.ReadFile(filepath.Join(comms, e.Name(), "local")); err == nil && strings.TrimSpace(string(local)) == "1" {
			return nil
		}
	}
	dir := filepath.Join(comms, strconv.FormatUint(uint64(nodeID), 10))
	if err := mkdirs(dir); err != nil {
		return fmt.Errorf("solo: %w", err)
	}
	// addr is a struct sockaddr_storage: AF_INET, port 0, 127.0.0.1.
	addr := make([]byte, 128)
	binary.LittleEndian.PutUint16(addr, unix.AF_INET)
	copy(addr[4:], []byte{127, 0, 0, 1})
	for _, s := range []struct {
		name  string
		value []byte
	}{
		{"nodeid", []byte(strconv.FormatUint(uint64(nodeID), 10))},
		{"addr", addr},
		{"local", []byte("1")},
	} {
		if err := writeBytes(filepath.Join(dir, s.name), s.value); err != nil {
			return fmt.Errorf("solo: configure node %d: %w", nodeID, err)
		}
	}
	return nil
}

// mkdirs makes each directory in turn, accepting existing ones.
func mkdirs(dirs ...string) error {
	for _, d := range dirs {
		if err := os.Mkdir(d, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
			return err
		}
	}
	return nil
}

// writeFile writes s to a configfs or sysfs attribute in one write.
func writeFile(path, s string) error { return writeBytes(path, []byte(s)) }

// writeBytes writes b to an attribute in one write: the kernel parses each
// write on its own.
func writeBytes(path string, b []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	return f.Close()
}
