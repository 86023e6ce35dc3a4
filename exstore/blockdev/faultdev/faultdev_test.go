package faultdev_test

import (
	"bytes"
	"errors"
	"io"
	"io/fs"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/exstore/blockdev/faultdev"
)

const sector = faultdev.SectorSize

// sectorOf returns a sector-sized buffer filled with b.
func sectorOf(b byte) []byte { return bytes.Repeat([]byte{b}, sector) }

func write(t *testing.T, d *faultdev.Device, p []byte, off int64) {
	t.Helper()
	n, err := d.WriteAt(p, off)
	require.NoError(t, err)
	require.Equal(t, len(p), n)
}

func writeSync(t *testing.T, d *faultdev.Device, p []byte, off int64) {
	t.Helper()
	n, err := d.WriteAtSync(p, off)
	require.NoError(t, err)
	require.Equal(t, len(p), n)
}

func read(t *testing.T, d *faultdev.Device, n int, off int64) []byte {
	t.Helper()
	p := make([]byte, n)
	got, err := d.ReadAt(p, off)
	require.NoError(t, err)
	require.Equal(t, n, got)
	return p
}

func TestReadYourWrites(t *testing.T) {
	d := faultdev.New("dev", 64<<10)
	assert.Equal(t, "dev", d.Name())
	assert.Equal(t, int64(64<<10), d.Size())
	assert.Equal(t, 1, d.Alignment())

	write(t, d, []byte("hello, world"), 1000)
	write(t, d, []byte("HELLO"), 1000)
	assert.Equal(t, "HELLO, world", string(read(t, d, 12, 1000)))
	assert.Equal(t, "HELLO, world", string(d.Bytes()[1000:1012]))
	assert.Equal(t, make([]byte, 12), d.DurableBytes()[1000:1012], "nothing is durable before a sync")

	require.NoError(t, d.Discard(1002, 3))
	assert.Equal(t, "HE\x00\x00\x00, world", string(read(t, d, 12, 1000)))
}

func TestReadAtEndReturnsEOF(t *testing.T) {
	d := faultdev.New("dev", 1000)
	write(t, d, []byte("end"), 997)
	p := make([]byte, 10)
	n, err := d.ReadAt(p, 997)
	assert.Equal(t, 3, n)
	assert.Equal(t, io.EOF, err)
	assert.Equal(t, "end", string(p[:n]))

	n, err = d.ReadAt(p, 1000)
	assert.Equal(t, 0, n)
	assert.Equal(t, io.EOF, err)

	_, err = d.ReadAt(p, -1)
	assert.Error(t, err)
}

func TestChangesMustFitInDevice(t *testing.T) {
	d := faultdev.New("dev", 4096)
	_, err := d.WriteAt(make([]byte, 10), 4090)
	assert.ErrorIs(t, err, blockdev.ErrOutOfRange)
	_, err = d.WriteAtSync(make([]byte, 10), -1)
	assert.ErrorIs(t, err, blockdev.ErrOutOfRange)
	assert.ErrorIs(t, d.Discard(4000, 100), blockdev.ErrOutOfRange)
	assert.ErrorIs(t, d.Discard(0, -1), blockdev.ErrOutOfRange)
	assert.Equal(t, faultdev.Stats{}, d.Stats(), "rejected operations count nowhere")
}

func TestSyncThenPowerCutKeepsEverything(t *testing.T) {
	d := faultdev.New("dev", 64<<10)
	rng := rand.New(rand.NewPCG(1, 1))
	for range 100 {
		off := rng.Int64N(d.Size() - 700)
		p := make([]byte, rng.IntN(700)+1)
		for i := range p {
			p[i] = byte(rng.Uint32())
		}
		write(t, d, p, off)
	}
	require.NoError(t, d.Discard(5000, 3000))
	want := d.Bytes()
	require.NoError(t, d.Sync())
	assert.Equal(t, want, d.DurableBytes())

	for seed := range uint64(20) {
		after := d.PowerCut(rand.New(rand.NewPCG(seed, 0)))
		assert.Equal(t, want, after.Bytes(), "seed %d", seed)
		assert.Equal(t, want, after.DurableBytes(), "seed %d", seed)
	}
}

func TestPowerCutDropAllKeepsOnlyDurableWrites(t *testing.T) {
	d := faultdev.New("dev", 16*sector)
	write(t, d, sectorOf('a'), 0)
	writeSync(t, d, sectorOf('b'), 2*sector)
	write(t, d, sectorOf('c'), 4*sector)

	after := d.PowerCutDropAll()
	assert.Equal(t, "dev", after.Name())
	assert.Equal(t, d.Size(), after.Size())
	assert.Equal(t, make([]byte, sector), read(t, after, sector, 0), "unsynced write lost")
	assert.Equal(t, sectorOf('b'), read(t, after, sector, 2*sector), "WriteAtSync'd write kept")
	assert.Equal(t, make([]byte, sector), read(t, after, sector, 4*sector), "unsynced write lost")
}

func TestPowerCutKeepAllKeepsNewest(t *testing.T) {
	d := faultdev.New("dev", 16*sector)
	write(t, d, sectorOf('a'), 0)
	write(t, d, sectorOf('b'), 0)
	write(t, d, []byte("xyz"), 3*sector+10)
	want := d.Bytes()

	after := d.PowerCutKeepAll()
	assert.Equal(t, want, after.Bytes())
	assert.Equal(t, want, after.DurableBytes(), "everything on the new device is durable")
}

func TestWriteAtSyncMakesOnlyItsSectorsDurable(t *testing.T) {
	d := faultdev.New("dev", 16*sector)
	write(t, d, sectorOf('a'), 0)
	// A partial write into sector 3 after an unsynced write to its start:
	// the FUA write carries the whole sector's newest content.
	write(t, d, []byte("head"), 3*sector)
	writeSync(t, d, []byte("tail"), 3*sector+100)

	durable := d.DurableBytes()
	assert.Equal(t, make([]byte, sector), durable[:sector], "other sectors stay pending")
	assert.Equal(t, "head", string(durable[3*sector:3*sector+4]))
	assert.Equal(t, "tail", string(durable[3*sector+100:3*sector+104]))
}

func TestWriteAfterWriteAtSyncCanBeLost(t *testing.T) {
	seen := map[byte]bool{}
	for seed := range uint64(64) {
		d := faultdev.New("dev", 4*sector)
		writeSync(t, d, sectorOf('s'), sector)
		write(t, d, sectorOf('n'), sector)

		after := d.PowerCut(rand.New(rand.NewPCG(seed, 7)))
		got := read(t, after, sector, sector)
		require.Contains(t, [][]byte{sectorOf('s'), sectorOf('n')}, got, "seed %d", seed)
		seen[got[0]] = true
	}
	assert.True(t, seen['s'], "the later write can be lost, leaving the synced version")
	assert.True(t, seen['n'], "the later write can survive")

	d := faultdev.New("dev", 4*sector)
	writeSync(t, d, sectorOf('s'), sector)
	write(t, d, sectorOf('n'), sector)
	assert.Equal(t, sectorOf('s'), read(t, d.PowerCutDropAll(), sector, sector))
}

func TestPowerCutProducesEveryOutcome(t *testing.T) {
	// A sector written three times can end up with its durable content or
	// any of the three versions.
	outcomes := map[byte]int{}
	for seed := range uint64(200) {
		d := faultdev.New("dev", 8*sector)
		write(t, d, sectorOf('1'), 2*sector)
		write(t, d, sectorOf('2'), 2*sector)
		write(t, d, sectorOf('3'), 2*sector)
		got := read(t, d.PowerCut(rand.New(rand.NewPCG(seed, 3))), sector, 2*sector)
		require.True(t, bytes.Equal(got, bytes.Repeat(got[:1], sector)), "seed %d: a sector never mixes versions", seed)
		outcomes[got[0]]++
	}
	for _, b := range []byte{0, '1', '2', '3'} {
		assert.Positive(t, outcomes[b], "outcome %q never produced: %v", b, outcomes)
	}
	assert.Len(t, outcomes, 4)

	// A write spanning two sectors can be kept, lost or torn either way.
	torn := map[[2]byte]bool{}
	for seed := range uint64(200) {
		d := faultdev.New("dev", 8*sector)
		write(t, d, bytes.Repeat([]byte{'w'}, 2*sector), 4*sector)
		got := d.PowerCut(rand.New(rand.NewPCG(seed, 5))).Bytes()
		torn[[2]byte{got[4*sector], got[5*sector]}] = true
	}
	assert.Len(t, torn, 4, "outcomes: %v", torn)
}

func TestPowerCutIsReproducible(t *testing.T) {
	build := func() *faultdev.Device {
		d := faultdev.New("dev", 64*sector)
		for i := range 64 {
			write(t, d, sectorOf(byte(i)), int64(i)*sector)
			write(t, d, sectorOf(byte(i+100)), int64(i)*sector)
		}
		return d
	}
	a := build().PowerCut(rand.New(rand.NewPCG(42, 42))).Bytes()
	b := build().PowerCut(rand.New(rand.NewPCG(42, 42))).Bytes()
	assert.Equal(t, a, b, "the same seed gives the same outcome")
}

func TestRepeatedCutsGiveOutcomesOfTheSameCut(t *testing.T) {
	d := faultdev.New("dev", 4*sector)
	writeSync(t, d, sectorOf('d'), 0)
	write(t, d, sectorOf('p'), 0)
	seen := map[byte]bool{}
	for seed := range uint64(64) {
		got := d.PowerCut(rand.New(rand.NewPCG(seed, 1))).Bytes()
		seen[got[0]] = true
	}
	assert.Equal(t, map[byte]bool{'d': true, 'p': true}, seen)
}

func TestDeadDeviceFailsEverything(t *testing.T) {
	d := faultdev.New("dev", 8*sector)
	write(t, d, sectorOf('x'), 0)
	after := d.PowerCutKeepAll()

	_, err := d.ReadAt(make([]byte, 10), 0)
	assert.ErrorIs(t, err, faultdev.ErrPowerCut)
	_, err = d.WriteAt([]byte("leak"), 0)
	assert.ErrorIs(t, err, faultdev.ErrPowerCut)
	_, err = d.WriteAt([]byte("leak"), d.Size())
	assert.ErrorIs(t, err, faultdev.ErrPowerCut, "dead wins over a bad range")
	_, err = d.WriteAtSync([]byte("leak"), 0)
	assert.ErrorIs(t, err, faultdev.ErrPowerCut)
	assert.ErrorIs(t, d.Sync(), faultdev.ErrPowerCut)
	assert.ErrorIs(t, d.Discard(0, 10), faultdev.ErrPowerCut)
	assert.ErrorIs(t, d.Close(), faultdev.ErrPowerCut)

	assert.Equal(t, sectorOf('x'), read(t, after, sector, 0))
	assert.Equal(t, make([]byte, sector), read(t, after, sector, sector))
}

func TestConcurrentWritersCannotLeakPastCut(t *testing.T) {
	d := faultdev.New("dev", 64*sector)
	var wg sync.WaitGroup
	start := make(chan struct{})
	results := make([]error, 4)
	for w := range results {
		wg.Go(func() {
			<-start
			for i := 0; ; i++ {
				off := int64((w*16 + i%16) * sector)
				if _, err := d.WriteAt(sectorOf(byte(w+1)), off); err != nil {
					results[w] = err
					return
				}
			}
		})
	}
	close(start)
	after := d.PowerCutKeepAll()
	image := after.Bytes()
	wg.Wait()

	for w, err := range results {
		assert.ErrorIs(t, err, faultdev.ErrPowerCut, "writer %d", w)
	}
	assert.Equal(t, image, after.Bytes(), "no write reached the new device")
}

func TestFaultInFlightDuringCut(t *testing.T) {
	d := faultdev.New("dev", 8*sector)
	entered := make(chan struct{})
	release := make(chan struct{})
	d.SetFault(func(op faultdev.Op, off, length int64) error {
		if op == faultdev.Write {
			close(entered)
			<-release
		}
		return nil
	})
	done := make(chan error)
	go func() {
		_, err := d.WriteAt(sectorOf('z'), 0)
		done <- err
	}()
	<-entered
	after := d.PowerCutKeepAll()
	close(release)
	assert.ErrorIs(t, <-done, faultdev.ErrPowerCut, "a write held in flight across the cut fails")
	assert.Equal(t, make([]byte, 8*sector), after.Bytes())
}

// A power cut while a FUA write's durability step is held in flight may keep
// any subset of its sectors: each sector is atomic, the write is not.
func TestCutInsideFUAWriteTearsAtSectors(t *testing.T) {
	const sectors = 3
	seen := map[string]bool{}
	for seed := uint64(0); seed < 64; seed++ {
		d := faultdev.New("dev", 4*sector)
		writeSync(t, d, bytes.Repeat([]byte{'o'}, sectors*sector), 0)
		entered := make(chan struct{})
		release := make(chan struct{})
		d.SetFault(func(op faultdev.Op, off, length int64) error {
			if op == faultdev.FUA {
				assert.Equal(t, int64(0), off)
				assert.Equal(t, int64(sectors*sector), length)
				close(entered)
				<-release
			}
			return nil
		})
		done := make(chan error)
		go func() {
			_, err := d.WriteAtSync(bytes.Repeat([]byte{'n'}, sectors*sector), 0)
			done <- err
		}()
		<-entered
		after := d.PowerCut(rand.New(rand.NewPCG(seed, 1)))
		close(release)
		require.ErrorIs(t, <-done, faultdev.ErrPowerCut, "a FUA write cut in flight is not acknowledged")
		img := after.Bytes()
		outcome := make([]byte, sectors)
		for s := range sectors {
			sec := img[s*sector : (s+1)*sector]
			require.True(t, bytes.Equal(sec, sectorOf('o')) || bytes.Equal(sec, sectorOf('n')), "sector %d is old or new, never mixed", s)
			outcome[s] = sec[0]
		}
		seen[string(outcome)] = true
	}
	assert.Len(t, seen, 1<<sectors, "every subset of the write's sectors survives some cut: %v", seen)
}

// A FUA step that fails leaves the write in the cache, pending: readable, but
// lost to a cut that drops pending writes, kept by one that keeps them.
func TestFailedFUALeavesWritePending(t *testing.T) {
	injected := errors.New("injected EIO")
	d := faultdev.New("dev", 4*sector)
	writeSync(t, d, sectorOf('o'), sector)
	d.ResetStats()
	d.SetFault(func(op faultdev.Op, off, length int64) error {
		if op == faultdev.FUA {
			return injected
		}
		return nil
	})
	_, err := d.WriteAtSync(sectorOf('n'), sector)
	require.ErrorIs(t, err, injected)
	assert.Contains(t, err.Error(), "fua at offset 512")
	assert.Equal(t, faultdev.Stats{}, d.Stats(), "a failed WriteAtSync counts nowhere")
	assert.Equal(t, sectorOf('n'), read(t, d, sector, sector), "the data reached the cache")
	assert.Equal(t, sectorOf('o'), d.DurableBytes()[sector:2*sector], "but is not durable")
	assert.Equal(t, sectorOf('o'), read(t, d.PowerCutDropAll(), sector, sector))
	assert.Equal(t, sectorOf('n'), read(t, d.PowerCutKeepAll(), sector, sector))
}

// WriteAtSync makes durable only its own sectors: an earlier plain write
// elsewhere stays pending and may be lost.
func TestWriteAtSyncLeavesOtherWritesPending(t *testing.T) {
	d := faultdev.New("dev", 4*sector)
	write(t, d, sectorOf('d'), 0)
	writeSync(t, d, sectorOf('m'), 3*sector)
	after := d.PowerCutDropAll()
	assert.Equal(t, make([]byte, sector), read(t, after, sector, 0), "the plain write was lost")
	assert.Equal(t, sectorOf('m'), read(t, after, sector, 3*sector))
}

func TestSetFaultFailsWithoutEffect(t *testing.T) {
	injected := errors.New("injected EIO")
	d := faultdev.New("dev", 16*sector)
	write(t, d, sectorOf('a'), 0)
	before, durableBefore := d.Bytes(), d.DurableBytes()
	d.ResetStats()

	var calls []faultdev.Op
	d.SetFault(func(op faultdev.Op, off, length int64) error {
		calls = append(calls, op)
		if off == 0 {
			return injected
		}
		return nil
	})

	p := sectorOf('r')
	n, err := d.ReadAt(p, 0)
	assert.Equal(t, 0, n)
	assert.ErrorIs(t, err, injected)
	assert.Contains(t, err.Error(), "dev")
	assert.Contains(t, err.Error(), "read at offset 0")
	assert.Equal(t, sectorOf('r'), p, "a failed read leaves the buffer alone")

	_, err = d.WriteAt(sectorOf('b'), 0)
	assert.ErrorIs(t, err, injected)
	_, err = d.WriteAtSync(sectorOf('b'), 0)
	assert.ErrorIs(t, err, injected)
	assert.ErrorIs(t, d.Discard(0, sector), injected)
	assert.ErrorIs(t, d.Sync(), injected, "Sync is asked about offset 0")
	assert.Equal(t, []faultdev.Op{faultdev.Read, faultdev.Write, faultdev.Write, faultdev.Discard, faultdev.Sync}, calls)

	assert.Equal(t, before, d.Bytes())
	assert.Equal(t, durableBefore, d.DurableBytes(), "a failed Sync makes nothing durable")
	assert.Equal(t, faultdev.Stats{}, d.Stats(), "failed operations count nowhere")

	write(t, d, sectorOf('c'), sector)
	assert.Equal(t, sectorOf('c'), read(t, d, sector, sector), "operations the fault lets through work")

	d.SetFault(nil)
	require.NoError(t, d.Sync())
	after := d.PowerCutDropAll()
	assert.Equal(t, sectorOf('a'), read(t, after, sector, 0))
}

func TestOpString(t *testing.T) {
	assert.Equal(t, "read", faultdev.Read.String())
	assert.Equal(t, "write", faultdev.Write.String())
	assert.Equal(t, "sync", faultdev.Sync.String())
	assert.Equal(t, "discard", faultdev.Discard.String())
	assert.Equal(t, "fua", faultdev.FUA.String())
	assert.Equal(t, "Op(9)", faultdev.Op(9).String())
}

func TestStatsCount(t *testing.T) {
	d := faultdev.New("dev", 16*sector)
	write(t, d, make([]byte, 100), 0)
	write(t, d, make([]byte, 50), 1000)
	writeSync(t, d, make([]byte, 7), 2000)
	read(t, d, 30, 0)
	_, err := d.ReadAt(make([]byte, 20), d.Size()-5)
	require.Equal(t, io.EOF, err)
	require.NoError(t, d.Sync())
	require.NoError(t, d.Discard(0, 10))

	assert.Equal(t, faultdev.Stats{
		Reads: 2, Writes: 2, Syncs: 1, WriteSyncs: 1, Discards: 1,
		BytesRead: 35, BytesWritten: 157,
	}, d.Stats())

	d.ResetStats()
	assert.Equal(t, faultdev.Stats{}, d.Stats())
}

func TestFromBytesIsDurableCopy(t *testing.T) {
	src := []byte("0123456789")
	d := faultdev.FromBytes("img", src)
	src[0] = 'X'
	assert.Equal(t, int64(10), d.Size())
	assert.Equal(t, "0123456789", string(d.Bytes()), "FromBytes copies")
	assert.Equal(t, "0123456789", string(d.DurableBytes()))
	assert.Equal(t, "0123456789", string(d.PowerCutDropAll().Bytes()))

	got := d.Bytes()
	got[1] = 'Y'
	assert.Equal(t, "0123456789", string(d.Bytes()), "Bytes returns a copy")
}

func TestShortLastSector(t *testing.T) {
	d := faultdev.New("dev", sector+100)
	write(t, d, bytes.Repeat([]byte{'q'}, 150), sector-50)
	after := d.PowerCutKeepAll()
	assert.Equal(t, d.Bytes(), after.Bytes())
	assert.Equal(t, int64(sector+100), after.Size())
}

func TestClose(t *testing.T) {
	d := faultdev.New("dev", 4*sector)
	write(t, d, sectorOf('c'), 0)
	require.NoError(t, d.Close())
	_, err := d.WriteAt(sectorOf('x'), 0)
	assert.ErrorIs(t, err, fs.ErrClosed)
	assert.ErrorIs(t, d.Sync(), fs.ErrClosed)
	assert.ErrorIs(t, d.Close(), fs.ErrClosed)

	after := d.PowerCutKeepAll()
	assert.Equal(t, sectorOf('c'), read(t, after, sector, 0), "a closed device can still lose power")
}
