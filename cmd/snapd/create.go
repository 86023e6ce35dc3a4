package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"

	"github.com/dustin/go-humanize"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/persistent"
	"github.com/clustersnap/clustersnap/volumes"
)

// minChunks is the smallest COW LVM accepts: header, one area, one data chunk.
const minChunks = 3

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
	if *cowSize != "" {
		size, err := humanize.ParseBytes(*cowSize)
		if err != nil {
			return usagef("--cow-size %q: %v", *cowSize, err)
		}
		if err := blockdev.Create(*cow, int64(size)); err != nil {
			return err
		}
	}
	summary, err := createSnapshot(ctx, *origin, *cow, chunkSectors, *force)
	if err != nil {
		return err
	}
	fmt.Fprintln(stdout, summary)
	return nil
}

// createSnapshot checks the pair and formats cow, labelled with a new UUID
// (and no cluster: the first clustered serve stamps one). It writes
// nothing unless every check passes.
func createSnapshot(ctx context.Context, originPath, cowPath string, chunkSectors uint32, force bool) (string, error) {
	oi, err := os.Stat(originPath)
	if err != nil {
		return "", fmt.Errorf("origin: %w", err)
	}
	ci, err := os.Stat(cowPath)
	if err != nil {
		return "", fmt.Errorf("cow: %w (create it with --cow-size SIZE)", err)
	}
	if os.SameFile(oi, ci) {
		return "", fmt.Errorf("cow %s: is the origin itself; a snapshot needs its own COW device", cowPath)
	}
	o, err := blockdev.Open(originPath, blockdev.Options{ReadOnly: true})
	if err != nil {
		return "", fmt.Errorf("origin: %w", err)
	}
	defer o.Close()
	dev, err := blockdev.Open(cowPath, blockdev.Options{Exclusive: true})
	if err != nil {
		return "", fmt.Errorf("cow: %w", err)
	}
	defer dev.Close()
	cb := int64(chunkSectors) * exstore.SectorSize
	if dev.Size() < minChunks*cb {
		return "", fmt.Errorf("cow %s: %s holds fewer than %d chunks of %s (header, metadata, data)",
			cowPath, humanize.IBytes(uint64(dev.Size())), minChunks, humanize.IBytes(uint64(cb)))
	}
	if !force {
		used, err := holdsData(dev, 2*cb)
		if err != nil {
			return "", err
		}
		if used {
			return "", fmt.Errorf("cow %s: already holds data (a snapshot or something else); use --force to format it anyway", cowPath)
		}
	}
	id, err := exstore.NewUUID()
	if err != nil {
		return "", err
	}
	s, err := persistent.Format(ctx, dev, chunkSectors, nil)
	if err != nil {
		return "", err
	}
	defer s.Close()
	if err := s.SetLabel(ctx, exstore.Label{UUID: id}); err != nil {
		return "", err
	}
	u := s.Usage()
	return fmt.Sprintf("formatted %s: %s COW %s for origin %s (%s), %s chunks, room for %s exceptions",
		cowPath, humanize.IBytes(uint64(dev.Size())), id, originPath, humanize.IBytes(uint64(o.Size())),
		humanize.IBytes(uint64(cb)), humanize.Comma(int64(s.Geometry().Capacity()))) + "\n" + "status: " + u.String(), nil
}

// holdsData reports whether the first n bytes of dev are not all zero.
func holdsData(dev blockdev.Device, n int64) (bool, error) {
	buf := blockdev.AlignedBuffer(int(min(n, 1<<20)), max(dev.Alignment(), 1))
	for off := int64(0); off < n; off += int64(len(buf)) {
		if _, err := dev.ReadAt(buf, off); err != nil {
			return false, fmt.Errorf("cow %s: read: %w", dev.Name(), err)
		}
		if !bytes.Equal(buf, make([]byte, len(buf))) {
			return true, nil
		}
	}
	return false, nil
}
