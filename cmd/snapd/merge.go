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
	flags := newFlags("merge", "--origin PATH --cow PATH", stderr)
	originPath := flags.String("origin", "", "origin image or block device to roll back")
	cowPath := flags.String("cow", "", "COW of the snapshot to roll the origin back to")
	if err := parse(flags, args); err != nil {
		return err
	}
	if *originPath == "" || *cowPath == "" {
		return usagef("--origin and --cow are required")
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
