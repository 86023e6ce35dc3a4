package volumes

import (
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/exstore/cow"
	"github.com/clustersnap/clustersnap/internal/cutcheck"
	"github.com/clustersnap/clustersnap/nbd"
	"github.com/clustersnap/clustersnap/persistent"
)

// recordingExporter records the exports a Set adds and removes.
type recordingExporter struct {
	mu      sync.Mutex
	names   []string
	removed []string
	refuse  error // AddExport's answer, when set
}

func (r *recordingExporter) AddExport(e nbd.Export) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.refuse != nil {
		return r.refuse
	}
	r.names = append(r.names, e.Name)
	return nil
}

func (r *recordingExporter) RemoveExport(_ context.Context, name string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	i := slices.Index(r.names, name)
	if i < 0 {
		return errors.New("not served")
	}
	r.names = slices.Delete(r.names, i, i+1)
	r.removed = append(r.removed, name)
	return nil
}

// serving opens f's origin without snapshots and exports it to a
// recording exporter.
func serving(t *testing.T, f fixture) (*Set, *recordingExporter) {
	v := open(t, Config{Origin: f.origin})
	x := &recordingExporter{}
	ex, err := v.Exports("")
	require.NoError(t, err)
	for _, e := range ex {
		require.NoError(t, x.AddExport(e))
	}
	v.Export(x, "")
	return v, x
}

// TestCreateSnapshotWhileWriting creates a snapshot while writers keep
// overwriting the origin, every write logged: the new snapshot must be a
// cut of their history (package cutcheck), and is exported at once.
func TestCreateSnapshotWhileWriting(t *testing.T) {
	const regionBytes = 3 * chunk
	f := newFixture(t)
	require.NoError(t, os.WriteFile(f.origin, make([]byte, originSize), 0o600))
	v, x := serving(t, f)
	h := cutcheck.New(regionBytes)
	ctx, stop := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	warm := make(chan struct{}, 3)
	for w := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(1, uint64(w)))
			buf := make([]byte, regionBytes)
			for n := 0; ctx.Err() == nil && n < 20000; n++ {
				_ = h.Write(rng.IntN(originSize/regionBytes), buf, func(p []byte, off int64) error { return v.Origin.WriteAt(ctx, p, off, false) })
				if n == 100 {
					warm <- struct{}{}
				}
			}
		}()
	}
	for range 3 {
		<-warm
	}
	cowPath := filepath.Join(t.TempDir(), "live.cow")
	h.CutBegins()
	st, err := v.CreateSnapshot(context.Background(), CreateRequest{Name: "live", COW: cowPath, CreateBytes: 2 * originSize})
	h.CutEnds()
	require.NoError(t, err)
	buf := make([]byte, regionBytes)
	for range 200 {
		require.NoError(t, h.Write(rand.IntN(originSize/regionBytes), buf, func(p []byte, off int64) error {
			return v.Origin.WriteAt(context.Background(), p, off, false)
		}))
	}
	stop()
	wg.Wait()

	assert.Equal(t, "live", st.Name)
	assert.Equal(t, "valid", st.State)
	assert.NotEmpty(t, st.UUID, "the COW is labelled")
	assert.Contains(t, x.names, "live")
	snaps := v.Snapshots()
	require.Len(t, snaps, 1)
	img := make([]byte, originSize)
	require.NoError(t, snaps[0].ReadAt(context.Background(), img, 0))
	assert.Empty(t, h.Check(img, 10))
	assert.Equal(t, []string{"live"}, statusNames(v))
}

func statusNames(v *Set) []string {
	var names []string
	for _, s := range v.Status().Snapshots {
		names = append(names, s.Name)
	}
	return names
}

// TestCreateSnapshotRefusals: a refused create changes nothing: no file
// created, nothing exported, no snapshot added.
func TestCreateSnapshotRefusals(t *testing.T) {
	f := newFixture(t)
	v, x := serving(t, f)
	dir := t.TempDir()
	_, err := v.CreateSnapshot(context.Background(), CreateRequest{Name: "first", COW: filepath.Join(dir, "first"), CreateBytes: cowSize})
	require.NoError(t, err)
	holdsData := filepath.Join(dir, "data")
	require.NoError(t, os.WriteFile(holdsData, []byte("precious"), 0o600))
	require.NoError(t, os.Truncate(holdsData, cowSize))
	for name, req := range map[string]CreateRequest{
		"the origin's name":    {Name: OriginExport, COW: filepath.Join(dir, "a"), CreateBytes: cowSize},
		"a name taken":         {Name: "first", COW: filepath.Join(dir, "b"), CreateBytes: cowSize},
		"an empty name":        {Name: "", COW: filepath.Join(dir, "c"), CreateBytes: cowSize},
		"a slash":              {Name: "a/b", COW: filepath.Join(dir, "d"), CreateBytes: cowSize},
		"a space":              {Name: "a b", COW: filepath.Join(dir, "e"), CreateBytes: cowSize},
		"the origin as COW":    {Name: "o", COW: f.origin},
		"a COW holding data":   {Name: "h", COW: holdsData},
		"a missing COW":        {Name: "m", COW: filepath.Join(dir, "missing")},
		"an existing file":     {Name: "x", COW: f.blank, CreateBytes: cowSize},
		"a COW of two chunks":  {Name: "t", COW: filepath.Join(dir, "tiny"), CreateBytes: 2 * chunk},
		"a too long name":      {Name: string(make([]byte, MaxSnapshotName+1)), COW: filepath.Join(dir, "l"), CreateBytes: cowSize},
		"an odd chunk size":    {Name: "k", COW: filepath.Join(dir, "k"), CreateBytes: cowSize, ChunkSectors: 3},
		"a COW served already": {Name: "again", COW: filepath.Join(dir, "first")},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := v.CreateSnapshot(context.Background(), req)
			require.Error(t, err)
			t.Log(err)
			if req.CreateBytes > 0 && req.COW != f.blank {
				_, serr := os.Stat(req.COW)
				assert.ErrorIs(t, serr, os.ErrNotExist, "a refused create leaves no file behind")
			}
		})
	}
	data, err := os.ReadFile(holdsData)
	require.NoError(t, err)
	assert.Equal(t, "precious", string(data[:8]))
	assert.Equal(t, []string{"first"}, statusNames(v))
	assert.Equal(t, []string{OriginExport, "first"}, x.names)

	x.refuse = errors.New("no more exports")
	_, err = v.CreateSnapshot(context.Background(), CreateRequest{Name: "unexported", COW: filepath.Join(dir, "u"), CreateBytes: cowSize})
	require.ErrorContains(t, err, "no more exports")
	assert.ErrorContains(t, err, "created, but not served")
	assert.Equal(t, []string{"first", "unexported"}, statusNames(v), "the snapshot is taken: it follows the origin")
}

// TestDeleteSnapshot removes the export (and the default export naming
// the snapshot) before taking the snapshot out, marks its COW invalid on
// disk, and closes its devices.
func TestDeleteSnapshot(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	v := open(t, Config{Origin: f.origin, Snapshots: []SnapshotSpec{{Name: "kept", COW: f.cow}}})
	x := &recordingExporter{}
	ex, err := v.Exports("gone")
	require.ErrorIs(t, err, ErrNoSuchExport)
	ex, err = v.Exports("")
	require.NoError(t, err)
	for _, e := range ex {
		require.NoError(t, x.AddExport(e))
	}
	v.Export(x, "gone")
	cowPath := filepath.Join(t.TempDir(), "gone.cow")
	_, err = v.CreateSnapshot(ctx, CreateRequest{Name: "gone", COW: cowPath, CreateBytes: cowSize})
	require.NoError(t, err)
	require.NoError(t, x.AddExport(nbd.Export{Name: ""})) // the default export, as a server would serve it
	gone := v.Snapshots()[1]
	require.NoError(t, v.Origin.WriteAt(ctx, make([]byte, chunk), 0, false))
	assert.Equal(t, uint64(1), gone.Store().Usage().Exceptions)

	require.ErrorIs(t, v.DeleteSnapshot(ctx, "nope"), ErrNoSuchSnapshot)
	require.NoError(t, v.DeleteSnapshot(ctx, "gone"))
	assert.Equal(t, []string{"", "gone"}, x.removed)
	assert.Equal(t, []string{"kept"}, statusNames(v))
	assert.ErrorIs(t, gone.Err(), cowErrRemoved())
	require.NoError(t, v.Origin.WriteAt(ctx, make([]byte, chunk), 8*chunk, false))

	// The COW is closed (an exclusive open succeeds) and marked invalid.
	dev, err := blockdev.Open(cowPath, blockdev.Options{Exclusive: true})
	require.NoError(t, err)
	defer dev.Close()
	st, err := persistent.Open(ctx, dev, persistent.Options{})
	require.NoError(t, err)
	defer st.Close()
	assert.ErrorIs(t, st.Err(), exstore.ErrInvalid)
	require.ErrorIs(t, v.DeleteSnapshot(ctx, "gone"), ErrNoSuchSnapshot)
}

func cowErrRemoved() error { return cow.ErrRemoved }
