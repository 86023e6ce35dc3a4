package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/dustin/go-humanize"

	"github.com/clustersnap/clustersnap/exstore/cow"
	"github.com/clustersnap/clustersnap/volumes"
)

func runMerge(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	flags := newFlags("merge", "--origin PATH --cow PATH | --control PATH --snapshot NAME [--no-wait] [--json]", stderr)
	originPath := flags.String("origin", "", "origin image or block device to roll back (offline: nothing serves it)")
	cowPath := flags.String("cow", "", "COW of the snapshot to roll the origin back to (offline)")
	controlPath := flags.String("control", "", "merge in the snapd serve running with this control socket, while it serves the origin")
	snapshot := flags.String("snapshot", "", "with --control: the snapshot to roll the origin back to (empty: resume the merge under way)")
	noWait := flags.Bool("no-wait", false, "with --control: start the merge and return; snapd status --control shows its progress")
	asJSON := flags.Bool("json", false, "with --control: print the merge's final status as JSON")
	if err := parse(flags, args); err != nil {
		return err
	}
	if *controlPath != "" {
		if *originPath != "" || *cowPath != "" {
			return usagef("--control merges in a running server: give --snapshot, not --origin or --cow")
		}
		return liveMerge(ctx, *controlPath, *snapshot, !*noWait, *asJSON, stdout, stderr)
	}
	if *snapshot != "" || *noWait || *asJSON {
		return usagef("--snapshot, --no-wait and --json go with --control")
	}
	if *originPath == "" || *cowPath == "" {
		return usagef("--origin and --cow are required (or --control and --snapshot for a running server)")
	}
	v, err := openVolumes(ctx, volumes.Config{Origin: *originPath, Snapshots: []volumes.SnapshotSpec{{Name: "merge", COW: *cowPath}}})
	if err != nil {
		return err
	}
	defer v.Close()
	snap := v.Snapshots()[0]
	if err := snap.Err(); err != nil && !errors.Is(err, cow.ErrMerging) {
		return fmt.Errorf("cow %s: cannot merge an invalid snapshot: %w", *cowPath, err)
	}
	total := snap.Store().Usage().Exceptions
	bar := newProgress(stderr, int64(total), "merging", "exceptions")
	start := time.Now()
	var done uint64
	err = v.Origin.Merge(ctx, snap, func(p cow.MergeProgress) {
		done = p.Done
		if bar != nil {
			bar.Set64(int64(p.Done))
		}
	})
	if bar != nil {
		bar.Finish()
	}
	rate := float64(done) / max(time.Since(start).Seconds(), 1e-9)
	if err != nil {
		if errors.Is(err, context.Canceled) {
			return fmt.Errorf("interrupted after %s of %s exceptions; run the same command again to resume",
				humanize.Comma(int64(done)), humanize.Comma(int64(total)))
		}
		return err
	}
	fmt.Fprintf(stdout, "merged %s exceptions into %s in %s (%.0f exceptions/s); the COW is now empty\n",
		humanize.Comma(int64(done)), *originPath, time.Since(start).Round(time.Millisecond), rate)
	return nil
}

// mergePoll is how often a live merge's progress is shown.
const mergePoll = 250 * time.Millisecond

// liveMerge starts (or resumes) a merge in a running server and, with
// wait, shows its progress until it ends. The merge runs on in the server
// if this command is interrupted.
func liveMerge(ctx context.Context, path, name string, wait, asJSON bool, stdout, stderr io.Writer) error {
	c, err := dialControl(ctx, path)
	if err != nil {
		return err
	}
	defer c.Close()
	st, err := c.StartMerge(ctx, name)
	if err != nil {
		return controlError(err)
	}
	if !wait {
		if asJSON {
			return printJSON(stdout, st)
		}
		fmt.Fprintf(stdout, "merging snapshot %s into the origin in the server (%s exceptions); snapd status --control %s shows its progress\n",
			st.Snapshot, humanize.Comma(int64(st.Total)), path)
		return nil
	}
	bar := newProgress(stderr, int64(st.Total), "merging "+st.Snapshot, "exceptions")
	start := time.Now()
	tick := time.NewTicker(mergePoll)
	defer tick.Stop()
	for st.State == volumes.MergeRunning {
		select {
		case <-ctx.Done():
			if bar != nil {
				bar.Finish()
			}
			return fmt.Errorf("stopped watching at %s of %s exceptions; the merge goes on in the server (snapd status --control %s)",
				humanize.Comma(int64(st.Done)), humanize.Comma(int64(st.Total)), path)
		case <-tick.C:
		}
		full, err := c.Status(ctx)
		if err != nil {
			return controlError(err)
		}
		if full.MergeJob == nil || full.MergeJob.Snapshot != st.Snapshot {
			return fmt.Errorf("the server no longer reports the merge of snapshot %s (was it restarted? snapd merge --control %s resumes it)", st.Snapshot, path)
		}
		st = *full.MergeJob
		if bar != nil {
			bar.Set64(int64(st.Done))
		}
	}
	if bar != nil {
		bar.Finish()
	}
	if asJSON {
		if err := printJSON(stdout, st); err != nil {
			return err
		}
	}
	if st.State == volumes.MergeFailed {
		return fmt.Errorf("merge of snapshot %s failed after %s of %s exceptions: %s", st.Snapshot, humanize.Comma(int64(st.Done)), humanize.Comma(int64(st.Total)), st.Error)
	}
	if !asJSON {
		fmt.Fprintf(stdout, "merged snapshot %s into the origin while it was served: %s exceptions in %s; the snapshot is gone and its COW is empty\n",
			st.Snapshot, humanize.Comma(int64(st.Done)), time.Since(start).Round(time.Millisecond))
	}
	return nil
}
