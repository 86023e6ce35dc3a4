package kernel

import (
	"fmt"
	"math/rand/v2"
	"strings"
)

// target is a device a guest writes to.
type target int

const (
	toOrigin   target = iota // the origin, through snapshot-origin (COW in the snapshot)
	toSnapshot               // the snapshot device itself
)

func (t target) String() string {
	if t == toOrigin {
		return "origin"
	}
	return "snapshot"
}

// payloadAlign is the alignment of each write's data on the payload disk, so
// that any write can read its data with O_DIRECT.
const payloadAlign = 4096

// guestWrite is one write a guest makes with dd.
type guestWrite struct {
	dev     target
	off     int64  // byte offset on the device
	data    []byte // what is written
	payload int64  // where data sits on the payload disk
}

// writePlan is a sequence of guest writes with known data. The data travel
// to the guest on a payload disk, so the host knows exactly what each device
// must hold afterwards, and the writes are replayed on host-side images.
type writePlan struct {
	writes      []guestWrite
	payloadSize int64
}

// add appends a write of data at off on dev.
func (p *writePlan) add(dev target, off int64, data []byte) {
	p.writes = append(p.writes, guestWrite{dev: dev, off: off, data: data, payload: p.payloadSize})
	p.payloadSize += (int64(len(data)) + payloadAlign - 1) / payloadAlign * payloadAlign
}

// mix describes a random plan on a device of a given size, in counts of
// writes of each shape.
type mix struct {
	aligned   int // one whole 4 KiB page, 4 KiB-aligned (O_DIRECT)
	sectors   int // 1 to 16 sectors at any sector, often crossing chunks (O_DIRECT)
	unaligned int // 1 to 3000 bytes at any byte offset (page cache, fsync)
}

// addRandom appends m's writes to dev, of size bytes, in random order and
// with random data.
func (p *writePlan) addRandom(rng *rand.Rand, dev target, size int64, m mix) {
	var shapes []int
	for range m.aligned {
		shapes = append(shapes, 0)
	}
	for range m.sectors {
		shapes = append(shapes, 1)
	}
	for range m.unaligned {
		shapes = append(shapes, 2)
	}
	rng.Shuffle(len(shapes), func(i, j int) { shapes[i], shapes[j] = shapes[j], shapes[i] })
	for _, shape := range shapes {
		var off, n int64
		switch shape {
		case 0:
			n = 4096
			off = rng.Int64N(size/n) * n
		case 1:
			n = (1 + rng.Int64N(16)) * 512
			off = rng.Int64N((size-n)/512+1) * 512
		default:
			n = 1 + rng.Int64N(3000)
			off = rng.Int64N(size - n + 1)
		}
		p.add(dev, off, randomBytes(rng, int(n)))
	}
}

// shuffle puts the writes in a random order; the payload stays where it is.
func (p *writePlan) shuffle(rng *rand.Rand) {
	rng.Shuffle(len(p.writes), func(i, j int) { p.writes[i], p.writes[j] = p.writes[j], p.writes[i] })
}

// payload is the payload disk's content.
func (p *writePlan) payload() []byte {
	b := make([]byte, max(p.payloadSize, payloadAlign))
	for _, w := range p.writes {
		copy(b[w.payload:], w.data)
	}
	return b
}

// apply replays the plan's writes to dev on img.
func (p *writePlan) apply(dev target, img []byte) {
	for _, w := range p.writes {
		if w.dev == dev {
			copy(img[w.off:], w.data)
		}
	}
}

// script is the shell commands that make the writes in the guest, reading
// their data from the payload device. Page- and sector-aligned writes use
// O_DIRECT; the others go through the page cache and are fsynced.
func (p *writePlan) script(payloadDev string, devs map[target]string) string {
	var b strings.Builder
	for _, w := range p.writes {
		dev := devs[w.dev]
		n := int64(len(w.data))
		switch {
		case w.off%4096 == 0 && n%4096 == 0:
			fmt.Fprintf(&b, "dd if=%s of=%s bs=4096 skip=%d seek=%d count=%d iflag=direct oflag=direct status=none\n",
				payloadDev, dev, w.payload/4096, w.off/4096, n/4096)
		case w.off%512 == 0 && n%512 == 0:
			fmt.Fprintf(&b, "dd if=%s of=%s bs=512 skip=%d seek=%d count=%d iflag=direct oflag=direct status=none\n",
				payloadDev, dev, w.payload/512, w.off/512, n/512)
		default:
			fmt.Fprintf(&b, "dd if=%s of=%s bs=%d skip=%d seek=%d count=1 iflag=skip_bytes oflag=seek_bytes conv=notrunc,fsync status=none\n",
				payloadDev, dev, n, w.payload, w.off)
		}
	}
	return b.String()
}

// randomBytes returns n bytes from rng.
func randomBytes(rng *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := 0; i < n; i += 8 {
		v := rng.Uint64()
		for j := 0; j < 8 && i+j < n; j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	return b
}
