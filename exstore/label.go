package exstore

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"

	"github.com/dustin/go-humanize"
)

// Label identifies a COW device and what it may be served with: see
// Labeler. Its zero value is "nothing known".
type Label struct {
	// UUID names the COW itself, whatever path a host sees it under.
	UUID UUID `json:"uuid"`
	// ClusterID is the cluster whose nodes serve the COW, "" before one
	// has.
	ClusterID string `json:"cluster_id"`
	// Origin is the origin the COW's exceptions are of; its zero value
	// means none was recorded yet.
	Origin OriginIdentity `json:"origin"`
	// Merge says whether the COW's snapshot is merging, or was merged,
	// into Origin.
	Merge MergeState `json:"merge,omitempty"`
}

// MergeState is where a COW stands in a merge of its snapshot into its
// origin (the kernel's snapshot-merge). A COW that is Merging must only be
// served as that merge: the origin reads the chunks the COW still holds
// from it, so serving it as a plain snapshot would show a stale view and
// serving the origin without it would lose writes. A Merged COW holds no
// exceptions and no view: it is refused as a snapshot until formatted
// again.
type MergeState uint8

const (
	// NotMerging is an ordinary snapshot's COW.
	NotMerging MergeState = iota
	// Merging is a COW whose snapshot merges into the label's origin.
	Merging
	// Merged is a COW whose snapshot was merged into the label's origin.
	Merged
)

// String names the state: "" for NotMerging, "merging", "merged".
func (m MergeState) String() string {
	switch m {
	case NotMerging:
		return ""
	case Merging:
		return "merging"
	case Merged:
		return "merged"
	}
	return fmt.Sprintf("merge state %d", uint8(m))
}

// MarshalText implements encoding.TextMarshaler with String.
func (m MergeState) MarshalText() ([]byte, error) {
	if m > Merged {
		return nil, fmt.Errorf("unknown merge state %d", uint8(m))
	}
	return []byte(m.String()), nil
}

// UnmarshalText implements encoding.TextUnmarshaler for String's names.
func (m *MergeState) UnmarshalText(b []byte) error {
	for _, st := range []MergeState{NotMerging, Merging, Merged} {
		if string(b) == st.String() {
			*m = st
			return nil
		}
	}
	return fmt.Errorf("unknown merge state %q", b)
}

// OriginIdentity is what tells one origin from another without reading
// it: its size and, when the device reports one, a stable id (such as
// "serial=..." for a disk).
type OriginIdentity struct {
	// Size is the origin's size in bytes.
	Size int64 `json:"size_bytes"`
	// ID is a stable id of the origin device, "" if it has none.
	ID string `json:"id"`
}

// IsZero reports whether nothing is recorded.
func (o OriginIdentity) IsZero() bool { return o == OriginIdentity{} }

func (o OriginIdentity) String() string {
	id := o.ID
	if id == "" {
		id = "(no id)"
	}
	return fmt.Sprintf("origin %s size %s (%d bytes)", id, humanize.IBytes(uint64(max(o.Size, 0))), o.Size)
}

// UUID is a 16-byte random identifier (RFC 9562 version 4).
type UUID [16]byte

// NewUUID returns a random version 4 UUID.
func NewUUID() (UUID, error) {
	var u UUID
	if _, err := rand.Read(u[:]); err != nil {
		return UUID{}, fmt.Errorf("random UUID: %w", err)
	}
	u[6] = u[6]&0x0f | 0x40 // version 4
	u[8] = u[8]&0x3f | 0x80 // RFC 9562 variant
	return u, nil
}

// IsZero reports whether u is the zero UUID, which names nothing.
func (u UUID) IsZero() bool { return u == UUID{} }

// String is the canonical 8-4-4-4-12 hex form.
func (u UUID) String() string {
	var b [36]byte
	hex.Encode(b[0:8], u[0:4])
	b[8] = '-'
	hex.Encode(b[9:13], u[4:6])
	b[13] = '-'
	hex.Encode(b[14:18], u[6:8])
	b[18] = '-'
	hex.Encode(b[19:23], u[8:10])
	b[23] = '-'
	hex.Encode(b[24:], u[10:])
	return string(b[:])
}

// MarshalText implements encoding.TextMarshaler (the canonical form).
func (u UUID) MarshalText() ([]byte, error) { return []byte(u.String()), nil }

// ParseUUID reads the canonical 8-4-4-4-12 hex form.
func ParseUUID(s string) (UUID, error) {
	var u UUID
	if len(s) != 36 || s[8] != '-' || s[13] != '-' || s[18] != '-' || s[23] != '-' {
		return UUID{}, fmt.Errorf("UUID %q: want the form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx", s)
	}
	src := s[0:8] + s[9:13] + s[14:18] + s[19:23] + s[24:]
	if _, err := hex.Decode(u[:], []byte(src)); err != nil {
		return UUID{}, fmt.Errorf("UUID %q: %w", s, err)
	}
	return u, nil
}

// UnmarshalText implements encoding.TextUnmarshaler (the canonical form).
func (u *UUID) UnmarshalText(b []byte) error {
	v, err := ParseUUID(string(b))
	if err != nil {
		return err
	}
	*u = v
	return nil
}
