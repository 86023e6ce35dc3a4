package control

import (
	"context"
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/volumes"
)

// fakeVolumes records the requests the ops pass on.
type fakeVolumes struct {
	created []volumes.CreateRequest
	deleted []string
}

func (f *fakeVolumes) Status() volumes.Status {
	st := volumes.Status{Origin: volumes.OriginStatus{Path: "/o"}}
	for _, r := range f.created {
		st.Snapshots = append(st.Snapshots, volumes.SnapshotStatus{Name: r.Name, COW: r.COW, State: "valid"})
	}
	return st
}

func (f *fakeVolumes) CreateSnapshot(_ context.Context, req volumes.CreateRequest) (volumes.SnapshotStatus, error) {
	for _, r := range f.created {
		if r.Name == req.Name {
			return volumes.SnapshotStatus{}, &volumes.ConfigError{Err: fmt.Errorf("snapshot %s: %w", req.Name, volumes.ErrSnapshotExists)}
		}
	}
	f.created = append(f.created, req)
	return volumes.SnapshotStatus{Name: req.Name, COW: req.COW, State: "valid"}, nil
}

func (f *fakeVolumes) StartMerge(_ context.Context, name string) (volumes.MergeJobStatus, error) {
	return volumes.MergeJobStatus{Snapshot: name, State: volumes.MergeRunning}, nil
}

func (f *fakeVolumes) DeleteSnapshot(_ context.Context, name string) error {
	for i, r := range f.created {
		if r.Name == name {
			f.created = append(f.created[:i], f.created[i+1:]...)
			f.deleted = append(f.deleted, name)
			return nil
		}
	}
	return &volumes.ConfigError{Err: fmt.Errorf("snapshot %s: %w", name, volumes.ErrNoSuchSnapshot)}
}

func TestSnapshotOps(t *testing.T) {
	f := &fakeVolumes{}
	path := start(t, Handlers(f))
	ctx := t.Context()
	c, err := Dial(ctx, path)
	require.NoError(t, err)
	defer c.Close()

	snaps, err := c.Snapshots(ctx)
	require.NoError(t, err)
	assert.NotNil(t, snaps, "an empty list is [], not null")
	st, err := c.CreateSnapshot(ctx, SnapshotCreateArgs{Name: "s", COW: "/c", ChunkBytes: 8192, COWBytes: 1 << 20, ReadOnly: true})
	require.NoError(t, err)
	assert.Equal(t, "s", st.Name)
	require.Len(t, f.created, 1)
	assert.Equal(t, volumes.CreateRequest{Name: "s", COW: "/c", ChunkSectors: 16, CreateBytes: 1 << 20, Options: f.created[0].Options}, f.created[0])
	assert.True(t, f.created[0].Options.ReadOnly)

	code := func(err error) Code {
		var ce *Error
		require.ErrorAs(t, err, &ce)
		return ce.Code
	}
	_, err = c.CreateSnapshot(ctx, SnapshotCreateArgs{Name: "s", COW: "/d"})
	assert.Equal(t, CodeExists, code(err))
	assert.Equal(t, CodeNotFound, code(c.DeleteSnapshot(ctx, "nope")))
	for name, args := range map[string]any{
		"no name":       SnapshotCreateArgs{COW: "/c"},
		"no cow":        SnapshotCreateArgs{Name: "n"},
		"odd chunk":     SnapshotCreateArgs{Name: "n", COW: "/c", ChunkBytes: 3000},
		"negative size": SnapshotCreateArgs{Name: "n", COW: "/c", COWBytes: -1},
		"unknown field": map[string]any{"name": "n", "cow": "/c", "chunk_size": "4KiB"},
		"wrong type":    map[string]any{"name": 5, "cow": "/c"},
		"no arguments":  nil,
		"a JSON array":  []string{"n"},
	} {
		assert.Equal(t, CodeBadRequest, code(c.Call(ctx, OpSnapshotCreate, args, nil)), name)
	}
	assert.Len(t, f.created, 1, "no refused request created anything")
	assert.Equal(t, CodeBadRequest, code(c.Call(ctx, OpSnapshotDelete, map[string]any{}, nil)))
	assert.Equal(t, CodeBadRequest, code(c.Call(ctx, OpSnapshotList, map[string]any{"x": 1}, nil)))
	assert.Equal(t, CodeBadRequest, code(c.Call(ctx, OpStatus, map[string]any{"x": 1}, nil)))

	require.NoError(t, c.DeleteSnapshot(ctx, "s"))
	assert.Equal(t, []string{"s"}, f.deleted)
	full, err := c.Status(ctx)
	require.NoError(t, err)
	assert.Equal(t, "/o", full.Origin.Path)
	assert.Empty(t, full.Snapshots)
}
