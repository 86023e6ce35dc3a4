package main

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/dustin/go-humanize"

	"github.com/clustersnap/clustersnap/volumes"
)

func runCreate(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	flags := newFlags("create", "--origin PATH --cow PATH [--chunk-size SIZE] [--cow-size SIZE] [--force]", stderr)
	origin := flags.String("origin", "", "origin image or block device the snapshot is of")
	cow := flags.String("cow", "", "COW file or block device to format")
	chunk := flags.String("chunk-size", "4KiB", "chunk size, a power of two from 512B to 1GiB")
	cowSize := flags.String("cow-size", "", "create the COW as a sparse file of this size (e.g. 1GiB) if it does not exist")
	force := flags.Bool("force", false, "format the COW even if it already holds data")
	if err := parse(flags, args); err != nil {
		return err
	}
	if *origin == "" || *cow == "" {
		return usagef("--origin and --cow are required")
	}
	chunkSectors, err := volumes.ParseChunkSize(*chunk)
	if err != nil {
		return usagef("--chunk-size: %v", err)
	}
	var createBytes int64
	if *cowSize != "" {
		size, err := humanize.ParseBytes(*cowSize)
		if err != nil {
			return usagef("--cow-size %q: %v", *cowSize, err)
		}
		createBytes = int64(size)
	}
	summary, err := createSnapshot(ctx, volumes.FormatSpec{Origin: *origin, COW: *cow, ChunkSectors: chunkSectors, CreateBytes: createBytes, Force: *force})
	if err != nil {
		return err
	}
	fmt.Fprintln(stdout, summary)
	return nil
}

// createSnapshot formats a COW (volumes.FormatCOW) and describes it.
func createSnapshot(ctx context.Context, spec volumes.FormatSpec) (string, error) {
	f, err := volumes.FormatCOW(ctx, spec)
	switch {
	case errors.Is(err, volumes.ErrCOWHoldsData):
		return "", fmt.Errorf("%w (use --force to format it anyway)", err)
	case errors.Is(err, volumes.ErrNoCOW):
		return "", fmt.Errorf("%w (--cow-size SIZE)", err)
	}
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("formatted %s: %s, origin %s\nstatus: %s", spec.COW, f, spec.Origin, f.Usage), nil
}
