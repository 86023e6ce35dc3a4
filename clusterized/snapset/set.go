package snapset

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"slices"
	"strings"
)

// MaxSnapshots is the most snapshots a set holds: the LVB counts them in
// 16 bits.
const MaxSnapshots = 1<<16 - 1

// DigestSize is the size of a set's digest: SHA-256 truncated to what the
// LVB has room for.
const DigestSize = 16

// Digest identifies a set of COW identities.
type Digest [DigestSize]byte

// String is the digest in hex.
func (d Digest) String() string { return hex.EncodeToString(d[:]) }

// Snapshot is one snapshot a node serves the origin with: the name it
// serves it under, for messages, and the identity of its COW, which every
// node serving that COW must compute alike. Only the identity enters the
// digest.
type Snapshot struct {
	Name     string
	Identity []byte
}

// Set is the set of snapshots a node serves an origin with. Its zero value
// is the empty set (an origin served without snapshots), which is a set
// like any other: a node without snapshots does not match a cluster with
// some.
type Set struct {
	snaps  []Snapshot // ordered by identity
	digest Digest
}

// NewSet returns the set of snaps. Identities must be non-empty and
// distinct; the order of snaps does not matter.
func NewSet(snaps ...Snapshot) (Set, error) {
	if len(snaps) > MaxSnapshots {
		return Set{}, fmt.Errorf("snapshot set: %d snapshots, at most %d", len(snaps), MaxSnapshots)
	}
	s := Set{snaps: slices.Clone(snaps)}
	for i := range s.snaps {
		s.snaps[i].Identity = bytes.Clone(s.snaps[i].Identity)
		if len(s.snaps[i].Identity) == 0 {
			return Set{}, fmt.Errorf("snapshot set: snapshot %s has an empty identity", s.snaps[i].Name)
		}
	}
	slices.SortFunc(s.snaps, func(a, b Snapshot) int { return bytes.Compare(a.Identity, b.Identity) })
	for i := 1; i < len(s.snaps); i++ {
		if bytes.Equal(s.snaps[i-1].Identity, s.snaps[i].Identity) {
			return Set{}, fmt.Errorf("snapshot set: snapshots %s and %s have the same identity %q", s.snaps[i-1].Name, s.snaps[i].Name, s.snaps[i].Identity)
		}
	}
	s.digest = digestOf(s.snaps)
	return s, nil
}

// digestOf hashes the count and each identity, length-prefixed, in order.
func digestOf(snaps []Snapshot) Digest {
	h := sha256.New()
	var b [binary.MaxVarintLen64]byte
	h.Write([]byte("clustersnap snapshot set\x00"))
	h.Write(binary.AppendUvarint(b[:0], uint64(len(snaps))))
	for _, s := range snaps {
		h.Write(binary.AppendUvarint(b[:0], uint64(len(s.Identity))))
		h.Write(s.Identity)
	}
	var d Digest
	copy(d[:], h.Sum(nil))
	return d
}

// Len is the number of snapshots.
func (s Set) Len() int { return len(s.snaps) }

// Digest identifies the set's identities.
func (s Set) Digest() Digest {
	if s.snaps == nil {
		return digestOf(nil)
	}
	return s.digest
}

// Snapshots returns the snapshots, ordered by identity.
func (s Set) Snapshots() []Snapshot { return slices.Clone(s.snaps) }

// Names returns the snapshots' names, ordered by identity.
func (s Set) Names() []string {
	names := make([]string, len(s.snaps))
	for i, sn := range s.snaps {
		names[i] = sn.Name
	}
	return names
}

// Value is the LVB value that publishes s as generation gen.
func (s Set) Value(gen uint64) Value {
	return Value{Count: uint16(len(s.snaps)), Generation: gen, Digest: s.Digest()}
}

// Matches reports whether v publishes this set, whatever its generation.
func (s Set) Matches(v Value) bool {
	return int(v.Count) == len(s.snaps) && v.Digest == s.Digest()
}

// String describes the set for messages: its size, names and digest.
func (s Set) String() string {
	return fmt.Sprintf("%d snapshots (%s), digest %s", len(s.snaps), strings.Join(s.Names(), ", "), s.Digest())
}
