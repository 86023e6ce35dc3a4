package main

import (
	"context"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/dustin/go-humanize"

	"github.com/clustersnap/clustersnap/control"
	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/volumes"
)

// startControl serves v's control socket at path until ctx ends; wait
// waits for it to stop.
func startControl(ctx context.Context, v *volumes.Set, path string) (wait func() error, err error) {
	ln, err := control.Listen(path)
	if err != nil {
		return nil, err
	}
	srv := control.NewServer(control.Handlers(v))
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	return func() error { return <-done }, nil
}

// dialControl connects to a running server's control socket.
func dialControl(ctx context.Context, path string) (*control.Client, error) {
	c, err := control.Dial(ctx, path)
	if err != nil {
		return nil, fmt.Errorf("%w (is 'snapd serve --control %s' running?)", err, path)
	}
	return c, nil
}

// liveStatus asks a running server for its status.
func liveStatus(ctx context.Context, path string) (volumes.Status, error) {
	c, err := dialControl(ctx, path)
	if err != nil {
		return volumes.Status{}, err
	}
	defer c.Close()
	return c.Status(ctx)
}

// printLiveStatus prints a running server's status for people.
func printLiveStatus(w io.Writer, st volumes.Status) {
	fmt.Fprintf(w, "origin %s: %s\n", st.Origin.Path, humanize.IBytes(uint64(st.Origin.SizeBytes)))
	if st.Catalog != "" {
		fmt.Fprintf(w, "catalog %s\n", st.Catalog)
	} else {
		fmt.Fprintf(w, "catalog: none (snapshots created live are not served again after a restart)\n")
	}
	if c := st.Cluster; c != nil {
		state := "member"
		if c.Lost {
			state = "LOST the lockspace: shared I/O stopped"
		}
		fmt.Fprintf(w, "cluster %s: node %d, lock engine %s, lockspace %s, %s\n", c.ID, c.NodeID, c.Engine, c.Lockspace, state)
		if set := c.SnapshotSet; set != nil {
			fmt.Fprintf(w, "snapshot set: %d snapshots, generation %d, digest %s\n", set.Snapshots, set.Generation, set.Digest)
		}
	}
	if len(st.Exports) > 0 {
		printExports(w, st.Exports)
	}
	for _, s := range st.Snapshots {
		sec := func(n uint64) string { return humanize.IBytes(n * exstore.SectorSize) }
		fmt.Fprintf(w, "snapshot %s (%s): %s\n", s.Name, s.COW, s.State)
		if s.UUID != "" {
			fmt.Fprintf(w, "  cow uuid:   %s\n", s.UUID)
		}
		fmt.Fprintf(w, "  exceptions: %s, allocated %s of %s\n", humanize.Comma(int64(s.Exceptions)), sec(s.AllocatedSectors), sec(s.TotalSectors))
		if c := s.Cluster; c != nil {
			fmt.Fprintf(w, "  cluster:    %s\n", countersLine(*c))
		}
	}
}

// countersLine is a clustered store's counters on one line.
func countersLine(c volumes.ClusterCounters) string {
	return fmt.Sprintf("metadata refreshes %d incremental, %d full; lock conversions %d up, %d down; %d counter publishes, %d invalid LVBs, %d drains",
		c.Refreshes, c.Reloads, c.UpConverts, c.DownConverts, c.Publishes, c.InvalidLVBs, c.Drains)
}

// writeClusterStats writes the clustered stores' counters to w, a line
// per snapshot, so that an operator sees the LVB counter at work in the
// server's log.
func writeClusterStats(v *volumes.Set, w io.Writer) {
	st := v.Status()
	if st.Cluster == nil {
		return
	}
	for _, s := range st.Snapshots {
		if s.Cluster != nil {
			fmt.Fprintf(w, "cluster %s node %d snapshot %s: %s\n", st.Cluster.ID, st.Cluster.NodeID, s.Name, countersLine(*s.Cluster))
		}
	}
}

// logClusterStats writes the counters every interval until ctx ends (never
// when interval is 0).
func logClusterStats(ctx context.Context, v *volumes.Set, interval time.Duration, w io.Writer) {
	if interval <= 0 {
		return
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			writeClusterStats(v, w)
		}
	}
}

// printExports prints the exports' clients and counters as a table.
func printExports(w io.Writer, exports []volumes.ExportStatus) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "EXPORT\tCLIENTS\tREADS\tREAD\tWRITES\tWRITTEN\tFLUSHES\tERRORS")
	for _, e := range exports {
		name := e.Name
		if name == "" {
			name = "(default)"
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%s\t%s\t%s\n", name, e.Clients, humanize.Comma(int64(e.Reads)), humanize.IBytes(e.ReadBytes),
			humanize.Comma(int64(e.Writes)), humanize.IBytes(e.WrittenBytes), humanize.Comma(int64(e.Flushes)), humanize.Comma(int64(e.Errors)))
	}
	tw.Flush()
}
