package snapset

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/lockc"
)

func TestLVBRoundTrip(t *testing.T) {
	s := mustSet(t, "a", "b")
	v := s.Value(7)
	got, ok, err := DecodeLVB(EncodeLVB(v))
	require.NoError(t, err)
	require.True(t, ok)
	assert.Equal(t, v, got)
	assert.True(t, s.Matches(got))

	_, ok, err = DecodeLVB(lockc.LVB{})
	assert.NoError(t, err)
	assert.False(t, ok, "zeros are no value")

	for name, mutate := range map[string]func(*lockc.LVB){
		"magic":        func(b *lockc.LVB) { b[0] ^= 1 },
		"version":      func(b *lockc.LVB) { b[4] = LVBVersion + 1 },
		"reserved":     func(b *lockc.LVB) { b[5] = 1 },
		"generation 0": func(b *lockc.LVB) { clear(b[8:16]) },
	} {
		b := EncodeLVB(v)
		mutate(&b)
		_, ok, err := DecodeLVB(b)
		assert.ErrorIs(t, err, ErrForeignValue, name)
		assert.False(t, ok, name)
	}
}

func TestSetDigest(t *testing.T) {
	ab, ba := mustSet(t, "a", "b"), mustSet(t, "b", "a")
	assert.Equal(t, ab.Digest(), ba.Digest(), "order does not matter")
	assert.NotEqual(t, ab.Digest(), mustSet(t, "a").Digest())
	assert.NotEqual(t, mustSet(t).Digest(), mustSet(t, "a").Digest(), "the empty set is a set")
	assert.Equal(t, mustSet(t).Digest(), Set{}.Digest(), "the zero Set is the empty set")
	// Identities are length-prefixed: "ab"+"c" is not "a"+"bc".
	x, err := NewSet(Snapshot{Name: "x", Identity: []byte("ab")}, Snapshot{Name: "y", Identity: []byte("c")})
	require.NoError(t, err)
	y, err := NewSet(Snapshot{Name: "x", Identity: []byte("a")}, Snapshot{Name: "y", Identity: []byte("bc")})
	require.NoError(t, err)
	assert.NotEqual(t, x.Digest(), y.Digest())
	assert.False(t, x.Matches(y.Value(1)))

	_, err = NewSet(Snapshot{Name: "a", Identity: []byte("same")}, Snapshot{Name: "b", Identity: []byte("same")})
	assert.ErrorContains(t, err, "same identity")
	_, err = NewSet(Snapshot{Name: "a"})
	assert.ErrorContains(t, err, "empty identity")
}
