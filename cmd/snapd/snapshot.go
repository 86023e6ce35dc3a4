package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"text/tabwriter"

	"github.com/dustin/go-humanize"

	"github.com/clustersnap/clustersnap/control"
	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/volumes"
)

// snapshotCommands are the subcommands of 'snapd snapshot', which manage
// the snapshots of a running server through its control socket.
func snapshotCommands() []command {
	return []command{
		{"create", "format a COW and add it to the running origin as a new snapshot, served at once", runSnapshotCreate},
		{"delete", "stop serving a snapshot and stop copying into it (its COW is marked invalid)", runSnapshotDelete},
		{"list", "list the running server's snapshots", runSnapshotList},
	}
}

func runSnapshot(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" {
		fmt.Fprintln(stderr, "Usage: snapd snapshot create|delete|list --control PATH ...")
		for _, c := range snapshotCommands() {
			fmt.Fprintf(stderr, "  %-7s %s\n", c.name, c.summary)
		}
		if len(args) == 0 {
			return usagef("name a subcommand")
		}
		return nil
	}
	for _, c := range snapshotCommands() {
		if c.name == args[0] {
			if err := c.run(ctx, args[1:], stdout, stderr); err != nil {
				return fmt.Errorf("%s: %w", c.name, err)
			}
			return nil
		}
	}
	return usagef("unknown subcommand %q (create, delete, list)", args[0])
}

// replyError is an error reply of the server, shown as its message.
type replyError struct{ reply *control.Error }

func (e replyError) Error() string { return e.reply.Msg }
func (e replyError) Unwrap() error { return e.reply }

// controlError shows a server's error reply by its message, a refusal of
// the request as a usage error, and names the flag that creates a missing
// COW.
func controlError(err error) error {
	var ce *control.Error
	if !errors.As(err, &ce) {
		return err
	}
	if strings.Contains(ce.Msg, volumes.ErrNoCOW.Error()) {
		ce = &control.Error{Code: ce.Code, Msg: ce.Msg + " (--cow-size SIZE)"}
	}
	if ce.Code == control.CodeBadRequest {
		return usageError{replyError{ce}}
	}
	return replyError{ce}
}

func runSnapshotCreate(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	flags := newFlags("snapshot create", "--control PATH --name NAME --cow COW [--chunk-size SIZE] [--cow-size SIZE] [--force] [--ro] [--overflow] [--json]", stderr)
	controlPath := flags.String("control", "", "the running server's control socket (serve --control)")
	name := flags.String("name", "", "the new snapshot's name: its NBD export name")
	cow := flags.String("cow", "", "COW file or block device to format, as the server's host names it")
	chunk := flags.String("chunk-size", "4KiB", "chunk size, a power of two from 512B to 1GiB")
	cowSize := flags.String("cow-size", "", "create the COW as a sparse file of this size (e.g. 1GiB); it must not exist")
	force := flags.Bool("force", false, "format the COW even if it already holds data")
	ro := flags.Bool("ro", false, "serve the snapshot read-only")
	overflow := flags.Bool("overflow", false, "a full COW fails the snapshot's writes instead of invalidating it")
	asJSON := flags.Bool("json", false, "print the new snapshot's status as JSON")
	if err := parse(flags, args); err != nil {
		return err
	}
	if *controlPath == "" || *name == "" || *cow == "" {
		return usagef("--control, --name and --cow are required")
	}
	if flags.NArg() > 0 {
		return usagef("unexpected arguments %q", flags.Args())
	}
	// The server shares this host's file system but not its working
	// directory.
	cowPath, err := filepath.Abs(*cow)
	if err != nil {
		return usagef("--cow %s: %v", *cow, err)
	}
	a := control.SnapshotCreateArgs{Name: *name, COW: cowPath, Force: *force, ReadOnly: *ro, Overflow: *overflow}
	cs, err := volumes.ParseChunkSize(*chunk)
	if err != nil {
		return usagef("--chunk-size: %v", err)
	}
	a.ChunkBytes = int64(cs) * exstore.SectorSize
	if *cowSize != "" {
		size, err := humanize.ParseBytes(*cowSize)
		if err != nil {
			return usagef("--cow-size %q: %v", *cowSize, err)
		}
		a.COWBytes = int64(size)
	}
	c, err := dialControl(ctx, *controlPath)
	if err != nil {
		return err
	}
	defer c.Close()
	st, err := c.CreateSnapshot(ctx, a)
	if err != nil {
		return controlError(err)
	}
	if *asJSON {
		return printJSON(stdout, st)
	}
	fmt.Fprintf(stdout, "created snapshot %s in %s (cow uuid %s): served as NBD export %q\n", st.Name, st.COW, st.UUID, st.Name)
	if full, err := c.Status(ctx); err == nil && full.Catalog == "" {
		fmt.Fprintf(stderr, "note: the server has no --catalog, so this snapshot is not recorded: restart it with --snapshot %s=%s, or the snapshot stops following the origin\n", st.Name, st.COW)
	}
	return nil
}

func runSnapshotDelete(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	flags := newFlags("snapshot delete", "--control PATH [--json] NAME", stderr)
	controlPath := flags.String("control", "", "the running server's control socket (serve --control)")
	asJSON := flags.Bool("json", false, "print the result as JSON")
	if err := parse(flags, args); err != nil {
		return err
	}
	if *controlPath == "" || flags.NArg() != 1 {
		return usagef("give --control and one snapshot name")
	}
	name := flags.Arg(0)
	c, err := dialControl(ctx, *controlPath)
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.DeleteSnapshot(ctx, name); err != nil {
		return controlError(err)
	}
	if *asJSON {
		return printJSON(stdout, map[string]string{"deleted": name})
	}
	fmt.Fprintf(stdout, "deleted snapshot %s: no longer served, and its COW is marked invalid\n", name)
	return nil
}

func runSnapshotList(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	flags := newFlags("snapshot list", "--control PATH [--json]", stderr)
	controlPath := flags.String("control", "", "the running server's control socket (serve --control)")
	asJSON := flags.Bool("json", false, "print a JSON array of the snapshots' status")
	if err := parse(flags, args); err != nil {
		return err
	}
	if *controlPath == "" || flags.NArg() > 0 {
		return usagef("give --control, and no arguments")
	}
	c, err := dialControl(ctx, *controlPath)
	if err != nil {
		return err
	}
	defer c.Close()
	snaps, err := c.Snapshots(ctx)
	if err != nil {
		return controlError(err)
	}
	if *asJSON {
		return printJSON(stdout, snaps)
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tSTATE\tEXCEPTIONS\tUSED\tCOW")
	for _, s := range snaps {
		state := s.State
		switch {
		case s.Merge != nil && s.Merge.Total > 0:
			state = fmt.Sprintf("merging (%.0f%%)", 100*float64(s.Merge.Done)/float64(s.Merge.Total))
		case s.Merge != nil:
			state = "merging"
		case state != "valid":
			state = "invalid"
		}
		used := "-"
		if s.TotalSectors > 0 {
			used = fmt.Sprintf("%s of %s (%.1f%%)", humanize.IBytes(s.AllocatedSectors*exstore.SectorSize),
				humanize.IBytes(s.TotalSectors*exstore.SectorSize), 100*float64(s.AllocatedSectors)/float64(s.TotalSectors))
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", s.Name, state, humanize.Comma(int64(s.Exceptions)), used, s.COW)
	}
	return tw.Flush()
}

// printJSON prints v as indented JSON.
func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
