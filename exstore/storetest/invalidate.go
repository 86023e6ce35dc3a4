package storetest

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
)

// testInvalidate checks that an invalidated store says why and refuses
// work, also after a Reopen.
func testInvalidate(t *testing.T, h Harness) {
	const c = 8
	ss := newSession(t, h, c, cowOfChunks(c, 64))
	ss.add(1)
	a, b := ss.prepare(2), ss.prepare(3)
	ss.writeData(b)
	bDone := ss.commitAsync(t.Context(), b)
	ss.notReturned(bDone, "Commit(b)")

	reason := errors.New("storetest: copying the origin chunk failed")
	require.NoError(t, ss.s.Invalidate(t.Context(), reason), "%s: Invalidate", h.Name)
	err := ss.s.Err()
	assert.ErrorIs(t, err, exstore.ErrInvalid, "%s: Err after Invalidate", h.Name)
	assert.ErrorIs(t, err, reason, "%s: Err after Invalidate", h.Name)
	var invalid *exstore.InvalidError
	assert.ErrorAs(t, err, &invalid, "%s: Err after Invalidate", h.Name)

	assert.ErrorIs(t, ss.s.Commit(t.Context(), a), exstore.ErrInvalid, "%s: Commit after Invalidate", h.Name)
	assert.ErrorIs(t, ss.result(bDone, "Commit(b)"), exstore.ErrInvalid, "%s: a Commit waiting during Invalidate", h.Name)
	_, err = ss.s.Prepare(t.Context(), 4)
	assert.ErrorIs(t, err, exstore.ErrInvalid, "%s: Prepare after Invalidate", h.Name)

	if h.Reopen == nil {
		return
	}
	ss.reopen()
	assert.ErrorIs(t, ss.s.Err(), exstore.ErrInvalid, "%s: Err after Reopen of an invalid store", h.Name)
	_, err = ss.s.Prepare(t.Context(), 5)
	assert.ErrorIs(t, err, exstore.ErrInvalid, "%s: Prepare after Reopen of an invalid store", h.Name)
}
