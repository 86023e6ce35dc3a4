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

	summary, err := createSnapshot(ctx, originPath, cowPath, chunk/exstore.SectorSize, false)
	if err != nil {
		return "", "", err
	}
	fmt.Fprintln(stdout, summary)

	cow, err := blockdev.Open(cowPath, blockdev.Options{Exclusive: true})
	if err != nil {
		return "", "", err
	}
	defer cow.Close()
	s, err := persistent.Open(ctx, cow, persistent.Options{NoFormat: true})
	if err != nil {
		return "", "", err
	}
	// Overwrite random origin chunks the way the COW engine does: copy
	// the old chunk to the COW, commit the exception, then write.
	written := 0
	for i := 0; i < writes; i++ {
		c := exstore.Chunk(rng.IntN(originSize / chunk))
		_, ok, release, err := s.Lookup(ctx, c)
		release()
		if err != nil {
			return "", "", err
		}
		if ok {
			continue // already copied: the snapshot keeps the first old data
		}
		e, err := s.Prepare(ctx, c)
		if err != nil {
			s.Close()
			return "", "", err
		}
		if _, err := origin.ReadAt(buf, int64(c)*chunk); err != nil {
			return "", "", err
		}
		if _, err := cow.WriteAt(buf, int64(e.New)*chunk); err != nil {
			return "", "", err
		}
		if err := s.Commit(ctx, e); err != nil {
			return "", "", err
		}
		fillRandom(rng, buf)
		if _, err := origin.WriteAt(buf, int64(c)*chunk); err != nil {
			return "", "", err
		}
		written++
	}
	s.Close()
	fmt.Fprintf(stdout, "overwrote %d origin chunks; each old chunk was copied to the COW first\n", written)

	// Reload the COW from disk and rebuild the snapshot view from it.
	s, err = persistent.Open(ctx, cow, persistent.Options{NoFormat: true})
	if err != nil {
		return "", "", err
	}
	defer s.Close()
	view, err := snapshotDigest(ctx, s, origin, cow)
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

// snapshotDigest hashes the snapshot view: COW data where an exception
// exists, origin data elsewhere.
func snapshotDigest(ctx context.Context, s exstore.Store, origin blockdev.Device, cow io.ReaderAt) ([sha256.Size]byte, error) {
	h := sha256.New()
	cb := int64(s.ChunkSectors()) * exstore.SectorSize
	buf := make([]byte, cb)
	for c := int64(0); c*cb < origin.Size(); c++ {
		n := min(cb, origin.Size()-c*cb)
		nw, ok, release, err := s.Lookup(ctx, exstore.Chunk(c))
		if err != nil {
			return [sha256.Size]byte{}, err
		}
		var src io.ReaderAt = origin
		off := c * cb
		if ok {
			src, off = cow, int64(nw)*cb
		}
		_, err = src.ReadAt(buf[:n], off)
		release()
		if err != nil {
			return [sha256.Size]byte{}, err
		}
		h.Write(buf[:n])
	}
	return [sha256.Size]byte(h.Sum(nil)), nil
}
