package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/schollz/progressbar/v3"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/exstore/cow"
	"github.com/clustersnap/clustersnap/persistent"
	"github.com/clustersnap/clustersnap/volumes"
)

// newProgress returns a progress bar on w when w is a terminal, and nil
// otherwise (scripts and logs get the final summary only).
func newProgress(w io.Writer, total int64, description, unit string) *progressbar.ProgressBar {
	f, ok := w.(*os.File)
	if !ok {
		return nil
	}
	if st, err := f.Stat(); err != nil || st.Mode()&os.ModeCharDevice == 0 {
		return nil
	}
	return progressbar.NewOptions64(total,
		progressbar.OptionSetWriter(w),
		progressbar.OptionSetDescription(description),
		progressbar.OptionShowCount(),
		progressbar.OptionShowIts(),
		progressbar.OptionSetItsString(unit),
		progressbar.OptionSetPredictTime(true),
		progressbar.OptionThrottle(100*time.Millisecond),
		progressbar.OptionClearOnFinish(),
	)
}

func runCheck(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	flags := newFlags("check", "[--json] COW", stderr)
	asJSON := flags.Bool("json", false, "print the report as JSON")
	if err := parse(flags, args); err != nil {
		return err
	}
	if flags.NArg() != 1 {
		return usagef("name one COW")
	}
	path := flags.Arg(0)
	dev, err := blockdev.Open(path, blockdev.Options{ReadOnly: true})
	if err != nil {
		return fmt.Errorf("cow %s: %w", path, err)
	}
	defer dev.Close()
	var bar *progressbar.ProgressBar
	r, err := persistent.Check(ctx, dev, func(done, max uint64) {
		if bar == nil {
			bar = newProgress(stderr, int64(max), "checking "+path, "areas")
		}
		if bar != nil {
			bar.Set64(int64(done))
		}
	})
	if bar != nil {
		bar.Finish()
	}
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(r); err != nil {
			return err
		}
	} else {
		cb := uint64(r.Header.ChunkSectors) * exstore.SectorSize
		fmt.Fprintf(stdout, "%s: %s exceptions in %d metadata areas, %s chunks, header %s\n", path,
			humanize.Comma(int64(r.Exceptions)), r.Areas, humanize.IBytes(cb), map[bool]string{true: "valid", false: "invalid (valid flag 0)"}[r.Header.Valid != 0])
		for _, p := range r.Problems {
			fmt.Fprintf(stdout, "error: %s\n", p)
		}
		if r.Errors > uint64(len(r.Problems)) {
			fmt.Fprintf(stdout, "... and %d more errors\n", r.Errors-uint64(len(r.Problems)))
		}
		for _, w := range r.Warnings {
			fmt.Fprintf(stdout, "warning: %s\n", w)
		}
	}
	if !r.OK() {
		return fmt.Errorf("cow %s: %d metadata errors, the first at area %d slot %d: %s",
			path, r.Errors, r.Problems[0].Area, r.Problems[0].Slot, r.Problems[0].What)
	}
	return nil
}

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
	snap := v.Snapshots[0]
	if err := snap.Err(); err != nil {
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
