package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"

	"github.com/dustin/go-humanize"
	"github.com/schollz/progressbar/v3"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/persistent"
)

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
		printLabel(stdout, r.Label, r.LabelError)
	}
	if r.Errors > 0 {
		return fmt.Errorf("cow %s: %d metadata errors, the first at area %d slot %d: %s",
			path, r.Errors, r.Problems[0].Area, r.Problems[0].Slot, r.Problems[0].What)
	}
	if !r.OK() {
		return fmt.Errorf("cow %s: the label cannot be used: %s", path, r.LabelError)
	}
	return nil
}
