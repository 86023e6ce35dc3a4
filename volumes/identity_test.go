package volumes

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/lockc/inproc"
	"github.com/clustersnap/clustersnap/persistent"
)

// readLabel reads the label of the COW file at path.
func readLabel(t *testing.T, path string) (exstore.Label, bool) {
	t.Helper()
	dev, err := blockdev.Open(path, blockdev.Options{ReadOnly: true})
	require.NoError(t, err)
	defer dev.Close()
	l, ok, err := persistent.ReadLabel(context.Background(), dev)
	require.NoError(t, err)
	return l, ok
}

// setLabel labels the COW file at path.
func setLabel(t *testing.T, path string, l exstore.Label) {
	t.Helper()
	dev, err := blockdev.Open(path, blockdev.Options{})
	require.NoError(t, err)
	defer dev.Close()
	s, err := persistent.Open(context.Background(), dev, persistent.Options{NoFormat: true})
	require.NoError(t, err)
	defer s.Close()
	require.NoError(t, s.SetLabel(context.Background(), l))
}

func TestClusteredOpenStampsAndRefusesAnotherClusterOrOrigin(t *testing.T) {
	f := newFixture(t)
	created, err := exstore.NewUUID()
	require.NoError(t, err)
	setLabel(t, f.cow, exstore.Label{UUID: created}) // as snapd create leaves it
	snaps := []SnapshotSpec{{Name: "snap", COW: f.cow}}
	engine := inproc.New()
	c1 := Config{Origin: f.origin, Snapshots: snaps, Cluster: &Cluster{ID: "c1", Engine: engine}, OriginID: "serial=ABC"}
	open(t, c1).Close()

	want := exstore.Label{UUID: created, ClusterID: "c1", Origin: exstore.OriginIdentity{Size: originSize, ID: "serial=ABC"}}
	l, ok := readLabel(t, f.cow)
	require.True(t, ok, "a clustered open stamps the label")
	assert.Equal(t, want, l, "the UUID snapd create made is kept")
	open(t, c1).Close() // the same cluster and origin again

	bigger := filepath.Join(t.TempDir(), "bigger")
	require.NoError(t, os.WriteFile(bigger, bytes.Repeat([]byte{0x11}, 2*originSize), 0o600))
	for _, tc := range []struct {
		name   string
		change func(c *Config)
		want   []string
	}{
		{"another cluster", func(c *Config) { c.Cluster = &Cluster{ID: "c2", Engine: engine} },
			[]string{`labelled for cluster "c1" origin serial=ABC size 1.0 MiB`, `this node serves cluster "c2" origin serial=ABC`}},
		{"another origin id", func(c *Config) { c.OriginID = "serial=XYZ" },
			[]string{`cluster "c1" origin serial=ABC`, `serves cluster "c1" origin serial=XYZ`}},
		{"another origin size", func(c *Config) { c.Origin = bigger },
			[]string{"size 1.0 MiB (1048576 bytes)", "size 2.0 MiB (2097152 bytes)"}},
		{"another origin size, not clustered", func(c *Config) { c.Origin, c.Cluster = bigger, nil },
			[]string{"labelled for origin serial=ABC size 1.0 MiB", "this origin is 2097152 bytes"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := c1
			tc.change(&c)
			_, err := Open(context.Background(), c)
			require.ErrorIs(t, err, ErrLabelMismatch)
			for _, w := range tc.want {
				assert.Contains(t, err.Error(), w)
			}
			assert.Contains(t, err.Error(), f.cow)
			l, _ := readLabel(t, f.cow)
			assert.Equal(t, want, l, "a refusal writes nothing")
		})
	}

	// Without a cluster, the cluster's fields and the origin id do not
	// matter (one host serves the COW after the cluster is down), and the
	// label is left as it is.
	open(t, Config{Origin: f.origin, Snapshots: snaps}).Close()
	open(t, Config{Origin: f.origin, Snapshots: snaps, OriginID: "serial=XYZ"}).Close()
	l, _ = readLabel(t, f.cow)
	assert.Equal(t, want, l)
}

func TestClusteredOpenLabelsAnUnlabelledCOW(t *testing.T) {
	f := newFixture(t) // formatted without a label, as the kernel leaves a COW
	_, ok := readLabel(t, f.cow)
	require.False(t, ok)
	open(t, Config{Origin: f.origin, Snapshots: []SnapshotSpec{{Name: "snap", COW: f.cow}}}).Close()
	_, ok = readLabel(t, f.cow)
	require.False(t, ok, "a serve without a cluster does not label")

	open(t, Config{Origin: f.origin, Snapshots: []SnapshotSpec{{Name: "snap", COW: f.cow}}, Cluster: &Cluster{ID: "c1", Engine: inproc.New()}}).Close()
	l, ok := readLabel(t, f.cow)
	require.True(t, ok)
	assert.False(t, l.UUID.IsZero(), "a UUID is made for the COW")
	assert.Equal(t, exstore.Label{UUID: l.UUID, ClusterID: "c1", Origin: exstore.OriginIdentity{Size: originSize}}, l,
		"a file origin has no id")
}

func TestOpenRefusesADamagedLabel(t *testing.T) {
	f := newFixture(t)
	u, err := exstore.NewUUID()
	require.NoError(t, err)
	setLabel(t, f.cow, exstore.Label{UUID: u, ClusterID: "c1"})
	fd, err := os.OpenFile(f.cow, os.O_RDWR, 0)
	require.NoError(t, err)
	_, err = fd.WriteAt([]byte{'x'}, 16+36) // the cluster id's first byte
	require.NoError(t, err)
	require.NoError(t, fd.Close())
	for _, cluster := range []*Cluster{nil, {ID: "c1", Engine: inproc.New()}} {
		_, err := Open(context.Background(), Config{Origin: f.origin, Snapshots: []SnapshotSpec{{Name: "snap", COW: f.cow}}, Cluster: cluster})
		require.ErrorIs(t, err, persistent.ErrBadLabel)
		assert.Contains(t, err.Error(), "checksum")
	}
}

func TestCheckLabel(t *testing.T) {
	abc := exstore.OriginIdentity{Size: 1 << 30, ID: "serial=ABC"}
	u := exstore.UUID{1}
	for _, tc := range []struct {
		name    string
		label   exstore.Label
		cluster string
		origin  exstore.OriginIdentity
		ok      bool
	}{
		{"unlabelled", exstore.Label{}, "c1", abc, true},
		{"no cluster yet", exstore.Label{UUID: u}, "c1", abc, true},
		{"no cluster yet, same origin", exstore.Label{UUID: u, Origin: abc}, "c1", abc, true},
		{"no cluster yet, another origin", exstore.Label{UUID: u, Origin: exstore.OriginIdentity{Size: 1 << 30, ID: "serial=XYZ"}}, "c1", abc, false},
		{"same", exstore.Label{UUID: u, ClusterID: "c1", Origin: abc}, "c1", abc, true},
		{"another cluster", exstore.Label{UUID: u, ClusterID: "c1", Origin: abc}, "c2", abc, false},
		{"another size", exstore.Label{UUID: u, ClusterID: "c1", Origin: abc}, "c1", exstore.OriginIdentity{Size: 1 << 29, ID: "serial=ABC"}, false},
		{"an id where none was", exstore.Label{UUID: u, ClusterID: "c1", Origin: exstore.OriginIdentity{Size: 1 << 30}}, "c1", abc, false},
	} {
		err := CheckLabel("/x", tc.label, tc.cluster, tc.origin)
		if tc.ok {
			assert.NoError(t, err, tc.name)
			continue
		}
		require.ErrorIs(t, err, ErrLabelMismatch, tc.name)
		assert.Contains(t, err.Error(), "COW /x ("+u.String()+")", tc.name)
		assert.Contains(t, err.Error(), tc.origin.String(), tc.name)
	}
}

func TestOriginIdentityFromSysfs(t *testing.T) {
	root := t.TempDir()
	put := func(rel, content string) {
		p := filepath.Join(root, rel)
		require.NoError(t, os.MkdirAll(filepath.Dir(p), 0o755))
		require.NoError(t, os.WriteFile(p, []byte(content), 0o644))
	}
	link := func(devno, target string) {
		require.NoError(t, os.MkdirAll(filepath.Join(root, "dev/block"), 0o755))
		require.NoError(t, os.MkdirAll(filepath.Join(root, target), 0o755))
		require.NoError(t, os.Symlink(filepath.Join("../..", target), filepath.Join(root, "dev/block", devno)))
	}
	link("252:0", "devices/pci0000:00/virtio2/block/vda")
	put("devices/pci0000:00/virtio2/block/vda/serial", "  ABC \n")
	link("252:1", "devices/pci0000:00/virtio2/block/vda/vda1")
	put("devices/pci0000:00/virtio2/block/vda/vda1/partition", "1\n")
	link("259:0", "devices/pci0000:00/nvme/nvme0/nvme0n1")
	put("devices/pci0000:00/nvme/nvme0/nvme0n1/wwid", "eui.0025388b71b3a1e0\n")
	put("devices/pci0000:00/nvme/nvme0/nvme0n1/device/serial", "S4EW\n")
	link("8:0", "devices/pci0000:00/host0/target0:0:0/0:0:0:0/block/sda")
	put("devices/pci0000:00/host0/target0:0:0/0:0:0:0/block/sda/device/wwid", "naa.5000c500a1b2c3d4\n")
	link("253:0", "devices/virtual/block/dm-0")
	put("devices/virtual/block/dm-0/dm/uuid", "LVM-abcdef\n")
	link("7:0", "devices/virtual/block/loop0")

	for devno, want := range map[[2]uint32]string{
		{252, 0}: "serial=ABC",
		{252, 1}: "serial=ABC,part=1",
		{259, 0}: "wwid=eui.0025388b71b3a1e0",
		{8, 0}:   "wwid=naa.5000c500a1b2c3d4",
		{253, 0}: "dm-uuid=LVM-abcdef",
		{7, 0}:   "",
		{9, 9}:   "",
	} {
		assert.Equal(t, want, sysfsID(root, devno[0], devno[1]), "%d:%d", devno[0], devno[1])
	}

	// A file has its size and no id.
	f := newFixture(t)
	dev, err := blockdev.Open(f.origin, blockdev.Options{ReadOnly: true})
	require.NoError(t, err)
	defer dev.Close()
	assert.Equal(t, exstore.OriginIdentity{Size: originSize}, OriginIdentity(dev, f.origin, root))
}
