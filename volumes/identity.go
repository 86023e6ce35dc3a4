package volumes

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
)

// sysfsIDFiles are the files of a block device's sysfs directory that hold
// a stable id, in the order they are asked: a device-mapper device's UUID
// (an LVM volume's), the disk's serial (virtio disks have it), the WWID
// (NVMe namespaces, SCSI disks), the controller's.
var sysfsIDFiles = [...]struct{ file, key string }{
	{"dm/uuid", "dm-uuid"}, {"serial", "serial"}, {"wwid", "wwid"}, {"device/wwid", "wwid"}, {"device/serial", "serial"},
}

// OriginIdentity is the identity of the origin opened as dev from path: its
// size and, for a block device, the stable id the kernel reports in sysfs
// (under sysRoot, "/sys" on a real system) as "FILE=VALUE", such as
// "serial=ABC" or "wwid=naa.5000..."; a partition's id is its disk's with
// ",part=N", a device-mapper device's "dm-uuid=...". A file, or a device with no such id, has an empty id.
func OriginIdentity(dev blockdev.Device, path, sysRoot string) exstore.OriginIdentity {
	id := exstore.OriginIdentity{Size: dev.Size()}
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return id
	}
	id.ID = sysfsID(sysRoot, unix.Major(uint64(st.Rdev)), unix.Minor(uint64(st.Rdev)))
	return id
}

// sysfsID reads the stable id of block device major:minor under sysRoot.
func sysfsID(sysRoot string, major, minor uint32) string {
	dir, err := filepath.EvalSymlinks(filepath.Join(sysRoot, "dev", "block", fmt.Sprintf("%d:%d", major, minor)))
	if err != nil {
		return ""
	}
	if part := readSysfs(filepath.Join(dir, "partition")); part != "" {
		if disk := firstSysfsID(filepath.Dir(dir)); disk != "" {
			return disk + ",part=" + part
		}
		return ""
	}
	return firstSysfsID(dir)
}

func firstSysfsID(dir string) string {
	for _, f := range sysfsIDFiles {
		if v := readSysfs(filepath.Join(dir, f.file)); v != "" {
			return f.key + "=" + v
		}
	}
	return ""
}

// readSysfs reads a small sysfs attribute, its blanks trimmed; "" if it
// is missing or unreadable.
func readSysfs(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// ErrLabelMismatch is wrapped by a refusal to serve a COW labelled for
// another cluster or another origin.
var ErrLabelMismatch = errors.New("the COW belongs to another cluster or origin")

// CheckLabel checks COW cow's label l against the cluster this node serves
// it for and the origin it serves it with: nil when they match, or when
// the label names no cluster yet (the caller then stamps it) and records
// no origin, or an origin that matches; otherwise an error naming both.
func CheckLabel(cow string, l exstore.Label, clusterID string, origin exstore.OriginIdentity) error {
	if l.ClusterID == "" && (l.Origin.IsZero() || l.Origin == origin) {
		return nil
	}
	if l.ClusterID == clusterID && l.Origin == origin {
		return nil
	}
	return fmt.Errorf("%w: COW %s (%s) is labelled for %s %s; this node serves cluster %q %s",
		ErrLabelMismatch, cow, l.UUID, labelCluster(l.ClusterID), l.Origin, clusterID, origin)
}

func labelCluster(id string) string {
	if id == "" {
		return "no cluster"
	}
	return fmt.Sprintf("cluster %q", id)
}

// checkUnclusteredLabel is what a serve without a cluster checks: the
// cluster's fields mean nothing to it (one host may serve a cluster's COW
// once the cluster is down), but a COW labelled for an origin of another
// size is not this origin's.
func checkUnclusteredLabel(cow string, l exstore.Label, origin exstore.OriginIdentity) error {
	if l.Origin.Size != 0 && l.Origin.Size != origin.Size {
		return fmt.Errorf("%w: COW %s (%s) is labelled for %s; this origin is %d bytes", ErrLabelMismatch, cow, l.UUID, l.Origin, origin.Size)
	}
	return nil
}

// labelCOW checks the label of the COW whose store is st for serving
// with origin, for cluster clusterID ("" for none), and, for a cluster,
// stamps a COW that has no label or no cluster in it yet. A store
// without labels (exstore.Labeler) passes.
func labelCOW(ctx context.Context, st exstore.Store, cow, clusterID string, origin exstore.OriginIdentity) error {
	lb, ok := st.(exstore.Labeler)
	if !ok {
		return nil
	}
	l, _, err := lb.Label(ctx)
	if err != nil {
		return err
	}
	if l.Merge == exstore.Merged {
		return fmt.Errorf("COW %s (%s): %w", cow, l.UUID, ErrMergedCOW)
	}
	if clusterID == "" {
		return checkUnclusteredLabel(cow, l, origin)
	}
	if err := CheckLabel(cow, l, clusterID, origin); err != nil {
		return err
	}
	if l.ClusterID == "" {
		return stampLabel(ctx, lb, l, clusterID, origin)
	}
	return nil
}

// stampLabel writes l with the cluster and the origin this node serves the
// COW for, and a new UUID if it has none. The caller has checked l
// (CheckLabel) and excludes the other nodes' stamping.
func stampLabel(ctx context.Context, lb exstore.Labeler, l exstore.Label, clusterID string, origin exstore.OriginIdentity) error {
	if l.UUID.IsZero() {
		u, err := exstore.NewUUID()
		if err != nil {
			return err
		}
		l.UUID = u
	}
	l.ClusterID, l.Origin = clusterID, origin
	if err := lb.SetLabel(ctx, l); err != nil {
		return fmt.Errorf("stamp label for cluster %q: %w", clusterID, err)
	}
	return nil
}
