package etcd

import (
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
	"strings"

	"github.com/clustersnap/clustersnap/lockc"
)

// The key layout of one lockspace, under Options.Prefix + the lockspace's
// name (path-escaped) + "/":
//
//	nodes              the last node id handed out (not leased)
//	r/<hex>/q/<lock>   one per lock, leased: its granted and requested mode
//	r/<hex>/lvb        the resource's LVB (not leased; absent: Unknown)
//	r/<hex>/w/<lock>   set while <lock> holds PW or EX (not leased)
//
// <hex> is the resource name in hexadecimal (names are binary), <lock> is
// the lock's owner lease and a per-lockspace counter. A w/<lock> without
// its q/<lock> is a writer whose lease expired: the next grant marks the
// LVB invalid and deletes the marker, so a dead writer's LVB is never
// trusted, without comparing clocks.
type layout struct {
	space string // prefix + escaped lockspace name + "/"
}

func newLayout(prefix, lockspace string) layout {
	return layout{space: prefix + url.PathEscape(lockspace) + "/"}
}

func (k layout) nodes() string     { return k.space + "nodes" }
func (k layout) resources() string { return k.space + "r/" }

// resource returns the prefix of every key of resource res.
func (k layout) resource(res []byte) string {
	return k.space + "r/" + hex.EncodeToString(res) + "/"
}

// resourceKeys are the keys of one resource.
type resourceKeys struct {
	prefix string // r/<hex>/
	hex    string
}

func (k layout) keysOf(res []byte) resourceKeys {
	return resourceKeys{prefix: k.resource(res), hex: hex.EncodeToString(res)}
}

func (r resourceKeys) queue() string             { return r.prefix + "q/" }
func (r resourceKeys) lock(name string) string   { return r.prefix + "q/" + name }
func (r resourceKeys) lvb() string               { return r.prefix + "lvb" }
func (r resourceKeys) writers() string           { return r.prefix + "w/" }
func (r resourceKeys) writer(name string) string { return r.prefix + "w/" + name }

// keyKind is what a key under r/ is.
type keyKind uint8

const (
	kindOther keyKind = iota
	kindLock
	kindLVB
	kindWriter
)

// parseKey splits a key under k.resources() into its resource (hex), kind
// and, for locks and writers, the lock's name.
func (k layout) parseKey(key string) (res string, kind keyKind, name string) {
	rest, ok := strings.CutPrefix(key, k.resources())
	if !ok {
		return "", kindOther, ""
	}
	res, rest, ok = strings.Cut(rest, "/")
	if !ok {
		return "", kindOther, ""
	}
	switch {
	case rest == "lvb":
		return res, kindLVB, ""
	case strings.HasPrefix(rest, "q/"):
		return res, kindLock, rest[2:]
	case strings.HasPrefix(rest, "w/"):
		return res, kindWriter, rest[2:]
	}
	return res, kindOther, ""
}

// entry is the value of a lock's key: its granted mode (none while a new
// request waits) and requested mode (the granted one when idle), the
// request's flags, the node, and the sequence number of the lock's last
// change, which tells whether a change whose answer was lost committed.
type entry struct {
	granted lockc.Mode
	held    bool // granted is valid
	rq      lockc.Mode
	flags   lockc.Flag
	node    uint32
	seq     uint64
}

// entrySize is the encoded size: magic, version, held, granted, requested,
// flags (4), node (4), seq (8).
const entrySize = 21

const (
	entryMagic = 'Q'
	lvbMagic   = 'L'
	version1   = 1
)

var errBadValue = errors.New("malformed value")

func (e entry) encode() string {
	b := make([]byte, entrySize)
	b[0], b[1] = entryMagic, version1
	if e.held {
		b[2] = 1
	}
	b[3], b[4] = byte(e.granted), byte(e.rq)
	binary.LittleEndian.PutUint32(b[5:], uint32(e.flags))
	binary.LittleEndian.PutUint32(b[9:], e.node)
	binary.LittleEndian.PutUint64(b[13:], e.seq)
	return string(b)
}

func decodeEntry(v []byte) (entry, error) {
	if len(v) != entrySize || v[0] != entryMagic || v[1] != version1 || v[2] > 1 {
		return entry{}, fmt.Errorf("lock entry %x: %w", v, errBadValue)
	}
	e := entry{
		held: v[2] == 1, granted: lockc.Mode(v[3]), rq: lockc.Mode(v[4]),
		flags: lockc.Flag(binary.LittleEndian.Uint32(v[5:])),
		node:  binary.LittleEndian.Uint32(v[9:]),
		seq:   binary.LittleEndian.Uint64(v[13:]),
	}
	if !e.granted.Valid() || !e.rq.Valid() {
		return entry{}, fmt.Errorf("lock entry %x: %w", v, errBadValue)
	}
	return e, nil
}

// queued reports whether the entry waits: a new request, or a conversion.
func (e entry) queued() bool { return !e.held || e.granted != e.rq }

// encodeLVB encodes a resource's LVB: magic, state, the 32 bytes.
func encodeLVB(v lockc.LVB, st lockc.LVBState) string {
	b := make([]byte, 2+lockc.LVBSize)
	b[0], b[1] = lvbMagic, byte(st)
	copy(b[2:], v[:])
	return string(b)
}

func decodeLVB(b []byte) (lockc.LVB, lockc.LVBState, error) {
	var v lockc.LVB
	if len(b) != 2+lockc.LVBSize || b[0] != lvbMagic || (lockc.LVBState(b[1]) != lockc.LVBValid && lockc.LVBState(b[1]) != lockc.LVBInvalid) {
		return v, lockc.LVBUnknown, fmt.Errorf("LVB %x: %w", b, errBadValue)
	}
	copy(v[:], b[2:])
	return v, lockc.LVBState(b[1]), nil
}
