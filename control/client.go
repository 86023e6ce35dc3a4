package control

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/clustersnap/clustersnap/volumes"
)

// Client sends requests to a control socket, one at a time. After an
// exchange fails (ctx ended, the server hung up) every later Call fails:
// dial again.
type Client struct {
	path string
	mu   sync.Mutex
	conn net.Conn
	r    *bufio.Reader
	// broken is the failure that left the connection out of step (a
	// reply may still be on its way): later calls fail with it.
	broken error
}

// Dial connects to the control socket at path.
func Dial(ctx context.Context, path string) (*Client, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	return &Client{path: path, conn: conn, r: bufio.NewReader(conn)}, nil
}

// Call sends op with args (marshalled as JSON; nil for none) and decodes
// the result into result (if not nil). An error reply is an *Error.
func (c *Client) Call(ctx context.Context, op string, args, result any) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.broken != nil {
		return fmt.Errorf("control %s: %s: the connection failed earlier: %w", c.path, op, c.broken)
	}
	req := request{Version: Version, Op: op}
	if args != nil {
		b, err := json.Marshal(args)
		if err != nil {
			return fmt.Errorf("control %s: %s: encode the arguments: %w", c.path, op, err)
		}
		req.Args = b
	}
	line, err := json.Marshal(req)
	if err != nil {
		return fmt.Errorf("control %s: %s: %w", c.path, op, err)
	}
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Time{}
	}
	if err := c.conn.SetDeadline(deadline); err != nil {
		return fmt.Errorf("control %s: %w", c.path, err)
	}
	stop := context.AfterFunc(ctx, func() { c.conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if _, err := c.conn.Write(append(line, '\n')); err != nil {
		return c.callErr(ctx, op, err)
	}
	b, err := readLine(c.r)
	if err != nil {
		return c.callErr(ctx, op, err)
	}
	var rep reply
	if err := json.Unmarshal(b, &rep); err != nil {
		return fmt.Errorf("control %s: %s: a reply that is not JSON: %w", c.path, op, err)
	}
	if !rep.OK {
		return &Error{Code: rep.Code, Msg: rep.Error}
	}
	if result != nil && len(rep.Result) > 0 {
		if err := json.Unmarshal(rep.Result, result); err != nil {
			return fmt.Errorf("control %s: %s: decode the result: %w", c.path, op, err)
		}
	}
	return nil
}

// callErr reports a failed exchange, as ctx's end when that caused it.
func (c *Client) callErr(ctx context.Context, op string, err error) error {
	if ctx.Err() != nil {
		err = ctx.Err()
	}
	c.broken = err
	return fmt.Errorf("control %s: %s: %w", c.path, op, err)
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// Status asks for the server's status (OpStatus).
func (c *Client) Status(ctx context.Context) (volumes.Status, error) {
	var st volumes.Status
	err := c.Call(ctx, OpStatus, nil, &st)
	return st, err
}

// Snapshots lists the snapshots served (OpSnapshotList).
func (c *Client) Snapshots(ctx context.Context) ([]volumes.SnapshotStatus, error) {
	var snaps []volumes.SnapshotStatus
	err := c.Call(ctx, OpSnapshotList, nil, &snaps)
	return snaps, err
}

// CreateSnapshot creates a snapshot of the serving origin
// (OpSnapshotCreate).
func (c *Client) CreateSnapshot(ctx context.Context, a SnapshotCreateArgs) (volumes.SnapshotStatus, error) {
	var st volumes.SnapshotStatus
	err := c.Call(ctx, OpSnapshotCreate, a, &st)
	return st, err
}

// DeleteSnapshot deletes a served snapshot (OpSnapshotDelete).
func (c *Client) DeleteSnapshot(ctx context.Context, name string) error {
	return c.Call(ctx, OpSnapshotDelete, SnapshotDeleteArgs{Name: name}, nil)
}

// StartMerge starts the merge of a served snapshot into the origin, or
// resumes the one under way with name "" (OpSnapshotMerge).
func (c *Client) StartMerge(ctx context.Context, name string) (volumes.MergeJobStatus, error) {
	var st volumes.MergeJobStatus
	err := c.Call(ctx, OpSnapshotMerge, SnapshotMergeArgs{Name: name}, &st)
	return st, err
}
