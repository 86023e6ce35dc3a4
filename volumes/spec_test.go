package volumes

import (
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore/cow"
)

func TestParseSnapshotSpec(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want SnapshotSpec
	}{
		{"snap=/dev/vg/cow", SnapshotSpec{Name: "snap", COW: "/dev/vg/cow"}},
		{"s=c,ro,overflow", SnapshotSpec{Name: "s", COW: "c", Options: cow.SnapshotOptions{ReadOnly: true, Overflow: true}}},
		{"s=c,type=P", SnapshotSpec{Name: "s", COW: "c", Type: "persistent"}},
		{"s=c,type=persistent,chunk=8KiB", SnapshotSpec{Name: "s", COW: "c", Type: "persistent", ChunkSectors: 16}},
		{"s=c,type=N,chunk=4KiB", SnapshotSpec{Name: "s", COW: "c", Type: "transient", ChunkSectors: 8}},
		{"s=c,chunk=512,type=n,ro", SnapshotSpec{Name: "s", COW: "c", Type: "transient", ChunkSectors: 1, Options: cow.SnapshotOptions{ReadOnly: true}}},
	} {
		got, err := ParseSnapshotSpec(tc.in)
		require.NoError(t, err, tc.in)
		assert.Equal(t, tc.want, got, tc.in)
	}
	for in, want := range map[string]string{
		"snap":                  "want NAME=COW",
		"=c":                    "want NAME=COW",
		"s=":                    "want NAME=COW",
		"s=,ro":                 "want NAME=COW",
		"origin=c":              "the origin's export",
		"s=c,rw":                `unknown snapshot option "rw"`,
		"s=c,type=Q":            `unknown store type "Q" (known: persistent (P), transient (N))`,
		"s=c,type=N":            "needs its chunk size",
		"s=c,type=N,chunk=3k":   "power of two",
		"s=c,chunk=lots":        `chunk size "lots"`,
		"s=c,type=N,chunk=2GiB": "power of two",
	} {
		_, err := ParseSnapshotSpec(in)
		assert.ErrorContains(t, err, want, in)
	}
}

func TestNewCluster(t *testing.T) {
	c, err := NewCluster("c1", "", ClusterOptions{})
	require.NoError(t, err)
	assert.Equal(t, "c1/snap", c.Resource("snap"))
	assert.NotNil(t, c.Engine)
	assert.False(t, c.Shared, "the in-process engine coordinates this host only")
	c, err = NewCluster("c1", "local", ClusterOptions{Lockspace: "ls1"})
	require.NoError(t, err)
	assert.Equal(t, "ls1", c.Lockspace)
	c, err = NewCluster("c1", "dlm", ClusterOptions{})
	require.NoError(t, err)
	assert.True(t, c.Shared, "the kernel DLM's nodes are other hosts")
	_, err = NewCluster("c1", "etcd2", ClusterOptions{})
	assert.ErrorContains(t, err, "known: "+LockEngines())
	assert.ErrorAs(t, err, new(*ConfigError))
	c, err = NewCluster("c1", "etcd", ClusterOptions{Etcd: EtcdOptions{Endpoints: []string{"unix:///nonexistent"}, LeaseTTL: 2 * time.Second}})
	require.NoError(t, err, "no server is asked before a store opens")
	assert.True(t, c.Shared, "etcd's nodes are other hosts or processes")
	assert.NoError(t, c.Close())
	for _, tc := range []struct {
		lock string
		o    EtcdOptions
		want string
	}{
		{"etcd", EtcdOptions{}, "no endpoints"},
		{"etcd", EtcdOptions{Endpoints: []string{"http://a:1", ""}}, "empty endpoint"},
		{"etcd", EtcdOptions{Endpoints: []string{"unix:///s"}, CAFile: "ca.pem"}, "plaintext"},
		{"etcd", EtcdOptions{Endpoints: []string{"https://a:1"}, KeyFile: "k.pem"}, "go together"},
		{"etcd", EtcdOptions{Endpoints: []string{"https://a:1"}, LeaseTTL: -time.Second}, "lease TTL"},
		{"dlm", EtcdOptions{Prefix: "/p/"}, "etcd options given for lock engine dlm"},
		{"", EtcdOptions{Endpoints: []string{"http://a:1"}}, "etcd options given for lock engine local"},
	} {
		_, err = NewCluster("c1", tc.lock, ClusterOptions{Etcd: tc.o})
		assert.ErrorContains(t, err, tc.want, "%+v", tc.o)
		assert.ErrorAs(t, err, new(*ConfigError), "%+v", tc.o)
	}
	_, err = NewCluster("c1", "etcd", ClusterOptions{Etcd: EtcdOptions{Endpoints: []string{"https://a:1"}, CAFile: "/nonexistent/ca.pem"}})
	assert.ErrorContains(t, err, "/nonexistent/ca.pem")
	assert.False(t, errors.As(err, new(*ConfigError)), "an unreadable file is not a usage error")
	for _, id := range []string{"", "a/b", string(make([]byte, 33)), "a\x00"} {
		_, err = NewCluster(id, "", ClusterOptions{})
		assert.Error(t, err, "%q", id)
	}
	for _, ls := range []string{"a/b", string(make([]byte, 65))} {
		_, err = NewCluster("c1", "", ClusterOptions{Lockspace: ls})
		assert.ErrorContains(t, err, "lockspace", "%q", ls)
	}
}
