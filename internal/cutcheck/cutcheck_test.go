package cutcheck

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

const regionBytes = 64

// image returns an image of n regions showing stamps.
func image(stamps ...uint64) []byte {
	b := make([]byte, len(stamps)*regionBytes)
	for i, s := range stamps {
		Fill(b[i*regionBytes:(i+1)*regionBytes], s)
	}
	return b
}

// history logs, on region 0: a acked before the cut, b sent before the cut
// and acked during it, c sent after the cut returned. Region 1 gets d,
// acked before the cut, then e, in flight over the whole cut. Region 2
// gets f, then g, both acked before the cut.
func history() (h *History, a, b, c, d, e, f, g uint64) {
	h = New(regionBytes)
	f = h.Send(2)
	h.Ack(f)
	g = h.Send(2)
	h.Ack(g)
	a = h.Send(0)
	h.Ack(a)
	d = h.Send(1)
	h.Ack(d)
	e = h.Send(1)
	b = h.Send(0)
	h.CutBegins()
	h.Ack(b)
	h.CutEnds()
	c = h.Send(0)
	h.Ack(c)
	h.Ack(e)
	return
}

func TestCheckAdmitsEveryCut(t *testing.T) {
	h, a, b, _, d, e, _, g := history()
	for _, img := range [][]byte{image(a, d, g), image(b, d, g), image(a, e, g), image(b, e, g)} {
		assert.Empty(t, h.Check(img, 0))
	}
}

// TestCheckCatchesEachViolation proves the checker against images no cut
// gives.
func TestCheckCatchesEachViolation(t *testing.T) {
	h, a, b, c, d, _, f, g := history()
	torn := image(a, d, g)
	Fill(torn[8:16], b)
	for name, img := range map[string][]byte{
		"a write sent after the cut returned": image(c, d, g),
		"an acknowledged write missing":       image(0, d, g),
		"a superseded write":                  image(a, d, f),
		"a write in part":                     torn,
		"a stamp never written":               image(a, 99, g),
		"another region's stamp":              image(d, d, g),
	} {
		assert.NotEmpty(t, h.Check(img, 0), name)
	}
	assert.NotEmpty(t, New(regionBytes).Check(image(0), 0), "a history without a cut")
	assert.Len(t, h.Check(image(c, 0, f), 1), 1, "limit")
}
