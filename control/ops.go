package control

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/clustersnap/clustersnap/exstore/cow"
	"github.com/clustersnap/clustersnap/volumes"
)

// The ops of protocol version 1.
const (
	// OpStatus reports the server (volumes.Status); no arguments.
	OpStatus = "status"
	// OpSnapshotList lists the snapshots served ([]volumes.SnapshotStatus);
	// no arguments.
	OpSnapshotList = "snapshot-list"
	// OpSnapshotCreate creates a snapshot of the serving origin
	// (SnapshotCreateArgs; the result is a volumes.SnapshotStatus).
	OpSnapshotCreate = "snapshot-create"
	// OpSnapshotDelete deletes a served snapshot (SnapshotDeleteArgs; no
	// result).
	OpSnapshotDelete = "snapshot-delete"
	// OpSnapshotMerge starts rolling the origin back to a snapshot while
	// it is served (SnapshotMergeArgs; the result is a
	// volumes.MergeJobStatus). The merge runs on in the server; "status"
	// reports its progress and end (merge_job).
	OpSnapshotMerge = "snapshot-merge"
)

// More codes of error replies, for the snapshot ops.
const (
	// CodeNotFound: no snapshot of that name is served.
	CodeNotFound Code = "not-found"
	// CodeExists: a snapshot of that name is served already.
	CodeExists Code = "exists"
)

// SnapshotCreateArgs are OpSnapshotCreate's arguments.
type SnapshotCreateArgs struct {
	// Name is the new snapshot's export name (required).
	Name string `json:"name"`
	// COW is the path, on the server's host, of the COW to format
	// (required).
	COW string `json:"cow"`
	// ChunkBytes is the chunk size in bytes; 0 means 4 KiB.
	ChunkBytes int64 `json:"chunk_size_bytes,omitempty"`
	// COWBytes, if not zero, creates the COW as a sparse file of this
	// size; an existing file is then refused.
	COWBytes int64 `json:"cow_size_bytes,omitempty"`
	// Force formats a COW that holds data.
	Force bool `json:"force,omitempty"`
	// ReadOnly and Overflow are the snapshot's options (--snapshot's ro
	// and overflow).
	ReadOnly bool `json:"read_only,omitempty"`
	Overflow bool `json:"overflow,omitempty"`
}

// SnapshotDeleteArgs are OpSnapshotDelete's arguments.
type SnapshotDeleteArgs struct {
	Name string `json:"name"`
}

// SnapshotMergeArgs are OpSnapshotMerge's arguments.
type SnapshotMergeArgs struct {
	// Name is the snapshot to merge; "" resumes the merge under way.
	Name string `json:"name"`
}

// Volumes is what the snapshot ops act on: a serving volumes.Set.
type Volumes interface {
	Status() volumes.Status
	CreateSnapshot(ctx context.Context, req volumes.CreateRequest) (volumes.SnapshotStatus, error)
	DeleteSnapshot(ctx context.Context, name string) error
	StartMerge(ctx context.Context, name string) (volumes.MergeJobStatus, error)
}

var _ Volumes = (*volumes.Set)(nil)

// Handlers are the handlers of every op of this version on v.
func Handlers(v Volumes) map[string]Handler {
	return map[string]Handler{
		OpStatus: func(ctx context.Context, args json.RawMessage) (any, error) {
			if err := noArgs(OpStatus, args); err != nil {
				return nil, err
			}
			return v.Status(), nil
		},
		OpSnapshotList: func(ctx context.Context, args json.RawMessage) (any, error) {
			if err := noArgs(OpSnapshotList, args); err != nil {
				return nil, err
			}
			snaps := v.Status().Snapshots
			if snaps == nil {
				snaps = []volumes.SnapshotStatus{}
			}
			return snaps, nil
		},
		OpSnapshotCreate: func(ctx context.Context, args json.RawMessage) (any, error) {
			var a SnapshotCreateArgs
			if err := decodeArgs(OpSnapshotCreate, args, &a); err != nil {
				return nil, err
			}
			req, err := a.request()
			if err != nil {
				return nil, err
			}
			st, err := v.CreateSnapshot(ctx, req)
			if err != nil {
				return nil, snapshotError(err)
			}
			return st, nil
		},
		OpSnapshotMerge: func(ctx context.Context, args json.RawMessage) (any, error) {
			var a SnapshotMergeArgs
			if err := decodeArgs(OpSnapshotMerge, args, &a); err != nil {
				return nil, err
			}
			st, err := v.StartMerge(ctx, a.Name)
			if err != nil {
				return nil, snapshotError(err)
			}
			return st, nil
		},
		OpSnapshotDelete: func(ctx context.Context, args json.RawMessage) (any, error) {
			var a SnapshotDeleteArgs
			if err := decodeArgs(OpSnapshotDelete, args, &a); err != nil {
				return nil, err
			}
			if a.Name == "" {
				return nil, BadRequest("%s: name is required", OpSnapshotDelete)
			}
			if err := v.DeleteSnapshot(ctx, a.Name); err != nil {
				return nil, snapshotError(err)
			}
			return struct{}{}, nil
		},
	}
}

// request checks the arguments and turns them into a volumes request.
func (a SnapshotCreateArgs) request() (volumes.CreateRequest, error) {
	if a.Name == "" || a.COW == "" {
		return volumes.CreateRequest{}, BadRequest("%s: name and cow are required", OpSnapshotCreate)
	}
	if a.COWBytes < 0 {
		return volumes.CreateRequest{}, BadRequest("%s: cow_size_bytes %d is negative", OpSnapshotCreate, a.COWBytes)
	}
	req := volumes.CreateRequest{
		Name: a.Name, COW: a.COW, CreateBytes: a.COWBytes, Force: a.Force,
		Options: cow.SnapshotOptions{ReadOnly: a.ReadOnly, Overflow: a.Overflow},
	}
	if a.ChunkBytes != 0 {
		cs, err := volumes.ParseChunkSize(fmt.Sprint(a.ChunkBytes))
		if err != nil {
			return volumes.CreateRequest{}, BadRequest("%s: %v", OpSnapshotCreate, err)
		}
		req.ChunkSectors = cs
	}
	return req, nil
}

// snapshotError gives a snapshot op's error its code.
func snapshotError(err error) error {
	switch {
	case errors.Is(err, volumes.ErrNoSuchSnapshot):
		return &Error{Code: CodeNotFound, Msg: err.Error()}
	case errors.Is(err, volumes.ErrSnapshotExists):
		return &Error{Code: CodeExists, Msg: err.Error()}
	case errors.As(err, new(*volumes.ConfigError)):
		return &Error{Code: CodeBadRequest, Msg: err.Error()}
	}
	return err
}

// noArgs refuses arguments to an op that takes none.
func noArgs(op string, args json.RawMessage) error {
	if len(args) > 0 && string(args) != "null" && string(args) != "{}" {
		return BadRequest("%s takes no arguments", op)
	}
	return nil
}

// decodeArgs decodes an op's arguments, refusing unknown fields (a
// misspelt option must not be ignored).
func decodeArgs(op string, args json.RawMessage, into any) error {
	if len(args) == 0 {
		return BadRequest("%s: arguments are required", op)
	}
	dec := json.NewDecoder(bytes.NewReader(args))
	dec.DisallowUnknownFields()
	if err := dec.Decode(into); err != nil {
		return BadRequest("%s: %v", op, err)
	}
	if dec.More() {
		return BadRequest("%s: trailing data after the arguments", op)
	}
	return nil
}
