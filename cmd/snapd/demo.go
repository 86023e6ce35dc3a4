package main

import (
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"

	"github.com/dustin/go-humanize"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/exstore/cow"
	"github.com/clustersnap/clustersnap/persistent"
	"github.com/clustersnap/clustersnap/volumes"
)

// runDemo shows the store on real files with nothing installed: a sparse
// origin, a formatted COW, origin overwrites that copy the old data first,
// then a reload of the COW from disk that must give back the snapshot view.
func runDemo(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	flags := newFlags("demo", "[--dir DIR] [--writes N] [--keep] [--listen ADDR] [--socket PATH] [--no-serve]", stderr)
	dir := flags.String("dir", "", "directory for origin.img and cow.img (default: a new temporary directory)")
	writes := flags.Int("writes", 500, "how many origin chunks to overwrite")
	keep := flags.Bool("keep", false, "keep the images (the temporary directory is otherwise removed)")
	listen := flags.String("listen", "127.0.0.1:10809", "TCP address to serve the demo on; empty for none")
	socket := flags.String("socket", "", "unix socket to serve the demo on")
	noServe := flags.Bool("no-serve", false, "stop after the check instead of serving")
	if err := parse(flags, args); err != nil {
		return err
	}
	if *writes < 0 {
		return usagef("--writes must not be negative")
	}
	if *dir == "" {
		d, err := os.MkdirTemp("", "snapd-demo-")
		if err != nil {
			return err
		}
		*dir = d
		if !*keep {
			defer os.RemoveAll(d)
		}
	}
	originPath, cowPath, err := demoCheck(ctx, *dir, *writes, stdout)
	if err != nil {
		return err
	}
	if *keep {
		fmt.Fprintf(stdout, "\nimages kept in %s; the kernel activates the snapshot with\n  dmsetup create snap --table \"0 %d snapshot ORIGIN_DEV COW_DEV P 0\"\n", *dir, demoOriginSize/exstore.SectorSize)
	}
	if *noServe {
		return nil
	}
	if *listen == "" && *socket == "" {
		return usagef("give --listen or --socket, or --no-serve")
	}
	fmt.Fprintln(stdout)
	v, err := openVolumes(ctx, volumes.Config{Origin: originPath, Snapshots: []volumes.SnapshotSpec{{Name: "snap", COW: cowPath}}})
	if err != nil {
		return err
	}
	defer v.Close()
	return serveVolumes(ctx, v, serveConfig{listen: *listen, socket: *socket}, stdout, stderr)
}

// demoOriginSize is the size of the demo's origin image.
const demoOriginSize = 64 << 20

// demoCheck makes the demo images in dir and checks the store on them; it
// closes everything it opened before it returns.
func demoCheck(ctx context.Context, dir string, writes int, stdout io.Writer) (originPath, cowPath string, err error) {
	const (
		originSize = demoOriginSize
		cowSize    = 16 << 20
		chunk      = 4096
	)
	originPath, cowPath = filepath.Join(dir, "origin.img"), filepath.Join(dir, "cow.img")
	for _, p := range []struct {
		path string
		size int64
	}{{originPath, originSize}, {cowPath, cowSize}} {
		if err := blockdev.Create(p.path, p.size); err != nil {
			return "", "", err
		}
	}
	origin, err := blockdev.Open(originPath, blockdev.Options{})
	if err != nil {
		return "", "", err
	}
	defer origin.Close()

	// Some content in the origin, so the snapshot has something to keep.
	rng := rand.New(rand.NewPCG(1, 2))
	buf := make([]byte, chunk)
	for c := int64(0); c < originSize/chunk; c += 4 {
		fillRandom(rng, buf)
		if _, err := origin.WriteAt(buf, c*chunk); err != nil {
			return "", "", err
		}
	}
	before, err := digest(origin, origin.Size())
	if err != nil {
		return "", "", err
	}
	fmt.Fprintf(stdout, "origin %s: %s, sha256 %x\n", originPath, humanize.IBytes(originSize), before[:8])

	summary, err := createSnapshot(ctx, volumes.FormatSpec{Origin: originPath, COW: cowPath, ChunkSectors: uint32(chunk / exstore.SectorSize)})
	if err != nil {
		return "", "", err
	}
	fmt.Fprintln(stdout, summary)

	cowDev, err := blockdev.Open(cowPath, blockdev.Options{Exclusive: true})
	if err != nil {
		return "", "", err
	}
	defer cowDev.Close()

	// Overwrite random origin chunks through the engine, which copies each
	// chunk's old data to the COW and commits its exception first.
	store, err := persistent.Open(ctx, cowDev, persistent.Options{NoFormat: true})
	if err != nil {
		return "", "", err
	}
	o := cow.NewOrigin(origin)
	if _, err := o.AddSnapshot("snap", store, cowDev, cow.SnapshotOptions{}); err != nil {
		store.Close()
		return "", "", err
	}
	for i := 0; i < writes; i++ {
		c := int64(rng.IntN(originSize / chunk))
		fillRandom(rng, buf)
		if err := o.WriteAt(ctx, buf, c*chunk, false); err != nil {
			store.Close()
			return "", "", err
		}
	}
	if err := o.Flush(ctx); err != nil {
		store.Close()
		return "", "", err
	}
	written := store.Usage().Exceptions
	if err := store.Close(); err != nil {
		return "", "", err
	}
	fmt.Fprintf(stdout, "overwrote %d origin chunks; each old chunk was copied to the COW first\n", written)

	// Reload the COW from disk and read the snapshot view through a new
	// engine on it.
	store, err = persistent.Open(ctx, cowDev, persistent.Options{NoFormat: true})
	if err != nil {
		return "", "", err
	}
	defer store.Close()
	snap, err := cow.NewOrigin(origin).AddSnapshot("snap", store, cowDev, cow.SnapshotOptions{ReadOnly: true})
	if err != nil {
		return "", "", err
	}
	view, err := snapshotDigest(ctx, snap)
	if err != nil {
		return "", "", err
	}
	if view != before {
		return "", "", fmt.Errorf("snapshot view sha256 %x differs from the origin before the writes (%x)", view[:8], before[:8])
	}
	fmt.Fprintf(stdout, "snapshot view rebuilt from %s after a reload: sha256 %x, identical to the origin before the writes\n\n", cowPath, view[:8])
	r, err := snapshotStatus(ctx, cowPath, 80)
	if err != nil {
		return "", "", err
	}
	printStatus(stdout, r)
	return originPath, cowPath, nil
}

func fillRandom(rng *rand.Rand, b []byte) {
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
}

func digest(r io.ReaderAt, size int64) ([sha256.Size]byte, error) {
	h := sha256.New()
	if _, err := io.Copy(h, io.NewSectionReader(r, 0, size)); err != nil {
		return [sha256.Size]byte{}, err
	}
	return [sha256.Size]byte(h.Sum(nil)), nil
}

// snapshotDigest hashes the snapshot view, as the engine reads it.
func snapshotDigest(ctx context.Context, s *cow.Snapshot) ([sha256.Size]byte, error) {
	h := sha256.New()
	buf := make([]byte, 1<<20)
	for off := int64(0); off < s.Size(); off += int64(len(buf)) {
		p := buf[:min(int64(len(buf)), s.Size()-off)]
		if err := s.ReadAt(ctx, p, off); err != nil {
			return [sha256.Size]byte{}, err
		}
		h.Write(p)
	}
	return [sha256.Size]byte(h.Sum(nil)), nil
}
