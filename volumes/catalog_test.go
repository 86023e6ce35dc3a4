package volumes

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
)

func testCatalog(t *testing.T) (*catalog, string) {
	path := filepath.Join(t.TempDir(), "catalog")
	c, err := openCatalog(path, blockdev.Options{Exclusive: true})
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return c, path
}

func record(names ...string) catalogRecord {
	rec := catalogRecord{Origin: exstore.OriginIdentity{Size: originSize}, Snapshots: []catalogEntry{}}
	for _, n := range names {
		rec.Snapshots = append(rec.Snapshots, catalogEntry{Name: n, COW: "/dev/" + n, Type: "P"})
	}
	return rec
}

// The catalog keeps the last record written, and a torn write of a record
// loses only that record.
func TestCatalogSlots(t *testing.T) {
	c, path := testCatalog(t)
	_, ok, err := c.load()
	require.NoError(t, err)
	assert.False(t, ok, "a new catalog holds no record")
	for _, names := range [][]string{{"a"}, {"a", "b"}, {"b"}} {
		require.NoError(t, c.store(record(names...)))
	}
	got, ok, err := c.load()
	require.NoError(t, err)
	require.True(t, ok)
	assert.Equal(t, record("b"), got)

	// Tear the newest record (sequence 3, slot 1): the one before shows.
	raw, err := os.ReadFile(path)
	require.NoError(t, err)
	raw[catalogSlotBytes+catalogHeader+3] ^= 0xff
	require.NoError(t, os.WriteFile(path, raw, 0o600))
	got, ok, err = c.load()
	require.NoError(t, err)
	require.True(t, ok)
	assert.Equal(t, record("a", "b"), got)
	// The next write goes to the torn slot, after the record read.
	require.NoError(t, c.store(record("c")))
	got, _, err = c.load()
	require.NoError(t, err)
	assert.Equal(t, record("c"), got)

	// Both slots torn, or not a catalog at all: refused with the reason.
	raw, err = os.ReadFile(path)
	require.NoError(t, err)
	raw[catalogHeader+1] ^= 0xff
	raw[catalogSlotBytes+catalogHeader+1] ^= 0xff
	require.NoError(t, os.WriteFile(path, raw, 0o600))
	_, _, err = c.load()
	assert.ErrorIs(t, err, ErrBadCatalog)
	assert.ErrorContains(t, err, "checksum")
	require.NoError(t, os.WriteFile(path, bytes.Repeat([]byte("not a catalog "), CatalogBytes/14+1), 0o600))
	_, _, err = c.load()
	assert.ErrorContains(t, err, "no catalog magic")
}

// A snapshot created live is served again after a restart with the
// catalog, without a --snapshot for it; one deleted live is not, and a
// --snapshot the catalog does not list is refused.
func TestCatalogServesLiveSnapshotsAfterARestart(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	cat := filepath.Join(t.TempDir(), "catalog")
	c := Config{Origin: f.origin, Snapshots: []SnapshotSpec{{Name: "boot", COW: f.cow}}, Catalog: cat}
	v, err := Open(ctx, c)
	require.NoError(t, err)
	live := filepath.Join(t.TempDir(), "live.cow")
	_, err = v.CreateSnapshot(ctx, CreateRequest{Name: "live", COW: live, CreateBytes: cowSize})
	require.NoError(t, err)
	require.NoError(t, v.Origin.WriteAt(ctx, bytes.Repeat([]byte{0x77}, chunk), 0, true))
	require.NoError(t, v.Close())

	v, err = Open(ctx, Config{Origin: f.origin, Catalog: cat})
	require.NoError(t, err)
	assert.Equal(t, []string{"boot", "live"}, statusNames(v))
	got := make([]byte, chunk)
	require.NoError(t, v.Snapshots()[1].ReadAt(ctx, got, 0))
	assert.Equal(t, bytes.Repeat([]byte{0x11}, chunk), got, "the live snapshot kept the origin as it was")
	require.NoError(t, v.DeleteSnapshot(ctx, "boot"))
	require.NoError(t, v.Close())

	v = open(t, Config{Origin: f.origin, Catalog: cat, Snapshots: []SnapshotSpec{{Name: "live", COW: live}}})
	assert.Equal(t, []string{"live"}, statusNames(v), "the deleted snapshot is not served again")
	require.NoError(t, v.Close())
	_, err = Open(ctx, c)
	assert.ErrorContains(t, err, "does not list it")
	var ce *ConfigError
	assert.ErrorAs(t, err, &ce)
	_, err = Open(ctx, Config{Origin: f.origin, Catalog: cat, Snapshots: []SnapshotSpec{{Name: "live", COW: f.cow}}})
	assert.ErrorContains(t, err, "lists it in")

	// Another origin's catalog is refused.
	other := filepath.Join(t.TempDir(), "other")
	require.NoError(t, os.WriteFile(other, make([]byte, 2*originSize), 0o600))
	_, err = Open(ctx, Config{Origin: other, Catalog: cat})
	assert.ErrorIs(t, err, ErrBadCatalog)
}

// FuzzCatalogSlot: any slot content is a record, no record, or an error
// naming ErrBadCatalog; never a panic, and a record's body lies inside the
// slot and its checksum holds.
func FuzzCatalogSlot(f *testing.F) {
	good := make([]byte, 256)
	encodeCatalogSlot(good, []byte(`{"snapshots":[]}`), 7)
	f.Add(good)
	f.Add(make([]byte, 64))
	f.Add([]byte(catalogMagic + "\x01\x00\x00\x00\xff\xff\xff\xff"))
	f.Fuzz(func(t *testing.T, b []byte) {
		body, seq, err := decodeCatalogSlot(b)
		if err != nil {
			if !errors.Is(err, ErrBadCatalog) {
				t.Fatalf("error %v does not wrap ErrBadCatalog", err)
			}
			return
		}
		if body == nil {
			return
		}
		again := make([]byte, catalogHeader+len(body))
		encodeCatalogSlot(again, body, seq)
		if !bytes.Equal(again, b[:len(again)]) {
			t.Fatalf("a slot decoded to a record that does not encode back to it")
		}
	})
}
