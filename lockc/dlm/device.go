package dlm

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// miscMajor is the character major of misc devices.
const miscMajor = 10

// controlName is the misc device of the lockspace control interface.
const controlName = "dlm-control"

// configfsComms is where a cluster controller lists the nodes, one
// directory each, the local one with local=1.
const configfsComms = "/sys/kernel/config/dlm/cluster/comms"

// ErrNoController: the kernel has no local node configured, so nobody
// would answer a lockspace join. Start dlm_controld (with corosync), or in
// tests the solo controller of package lockc/dlm/solo.
var ErrNoController = errors.New("no DLM controller: dlm_controld (or a test controller) must configure the local node in configfs")

// ErrNoDLM: the kernel has no DLM (no dlm-control misc device).
var ErrNoDLM = errors.New("kernel has no DLM (modprobe dlm; mount configfs)")

// miscMinor returns the minor of the misc device name from /proc/misc.
func miscMinor(name string) (uint32, error) {
	f, err := os.Open("/proc/misc")
	if err != nil {
		return 0, fmt.Errorf("misc device %s: %w", name, err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) == 2 && fields[1] == name {
			m, err := strconv.ParseUint(fields[0], 10, 32)
			if err != nil {
				return 0, fmt.Errorf("/proc/misc line %q: %w", sc.Text(), err)
			}
			return uint32(m), nil
		}
	}
	if err := sc.Err(); err != nil {
		return 0, fmt.Errorf("/proc/misc: %w", err)
	}
	return 0, fmt.Errorf("misc device %s not in /proc/misc: %w", name, fs.ErrNotExist)
}

// openDevice opens the misc character device name with the given minor:
// a node in dir (if set), /dev/misc or /dev whose device number matches,
// else a node made with mknod in a private temporary directory and removed
// once open. The file is non-blocking, so reads go through the netpoller.
func openDevice(dir, name string, minor uint32) (*os.File, error) {
	want := unix.Mkdev(miscMajor, minor)
	dirs := []string{"/dev/misc", "/dev"}
	if dir != "" {
		dirs = []string{dir}
	}
	for _, d := range dirs {
		path := filepath.Join(d, name)
		var st unix.Stat_t
		if err := unix.Stat(path, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFCHR || st.Rdev != want {
			continue
		}
		return openNode(path)
	}
	tmp, err := os.MkdirTemp(dir, "lockc-dlm-")
	if err != nil {
		return nil, fmt.Errorf("device %s: no node with minor %d and no directory for one: %w", name, minor, err)
	}
	defer os.RemoveAll(tmp)
	path := filepath.Join(tmp, name)
	if err := unix.Mknod(path, unix.S_IFCHR|0o600, int(want)); err != nil {
		return nil, fmt.Errorf("mknod %s (10:%d): %w", path, minor, err)
	}
	return openNode(path)
}

// openNode opens a device node read-write, non-blocking.
func openNode(path string) (*os.File, error) {
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	return os.NewFile(uintptr(fd), path), nil
}

// localNodeID reads the local node's id from configfs: the comms entry
// with local=1.
func localNodeID() (uint32, error) {
	entries, err := os.ReadDir(configfsComms)
	if err != nil {
		return 0, fmt.Errorf("local node id: %w: %w", err, ErrNoController)
	}
	for _, e := range entries {
		local, err := os.ReadFile(filepath.Join(configfsComms, e.Name(), "local"))
		if err != nil || strings.TrimSpace(string(local)) != "1" {
			continue
		}
		id, err := os.ReadFile(filepath.Join(configfsComms, e.Name(), "nodeid"))
		if err != nil {
			return 0, fmt.Errorf("local node id: %w", err)
		}
		n, err := strconv.ParseUint(strings.TrimSpace(string(id)), 10, 32)
		if err != nil {
			return 0, fmt.Errorf("local node id %q: %w", id, err)
		}
		return uint32(n), nil
	}
	return 0, fmt.Errorf("no comms entry with local=1 in %s: %w", configfsComms, ErrNoController)
}
