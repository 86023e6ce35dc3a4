package dlm

import (
	"encoding/binary"
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/lockc"
)

// A LOCK request puts every field at the offset of the 64-bit
// dlm_write_request (specs/locks.md §2): the header, then the lock params
// at 16, the name at 120.
func TestEncodeLockOffsets(t *testing.T) {
	v := version{6, 0, 2}
	lvb := lockc.LVB{0xaa, 31: 0xbb}
	b, err := encodeLock(v, cmdLock, lockParams{
		mode: lockc.PW, flags: lkfConvert | lkfValBlk, lkid: 0x01020304,
		castParam: 0x1122334455667788, bastParam: 0x99, lvb: lvb, name: []byte("res"),
	})
	require.NoError(t, err)
	assert.Len(t, b, 123, "120 bytes and the name")
	le := binary.LittleEndian
	assert.Equal(t, []uint32{6, 0, 2}, []uint32{le.Uint32(b[0:]), le.Uint32(b[4:]), le.Uint32(b[8:])})
	assert.EqualValues(t, cmdLock, b[12])
	assert.EqualValues(t, 1, b[13], "is64bit")
	assert.Equal(t, []byte{0, 0}, b[14:16])
	assert.EqualValues(t, lockc.PW, b[16], "mode")
	assert.EqualValues(t, 3, b[17], "namelen")
	assert.EqualValues(t, lkfConvert|lkfValBlk, le.Uint32(b[20:]), "flags")
	assert.EqualValues(t, 0x01020304, le.Uint32(b[24:]), "lkid")
	assert.Zero(t, le.Uint32(b[28:]), "parent")
	assert.Zero(t, le.Uint64(b[32:]), "xid")
	assert.Zero(t, le.Uint64(b[40:]), "timeout")
	assert.EqualValues(t, uint64(0x1122334455667788), le.Uint64(b[48:]), "castparam")
	assert.EqualValues(t, castAddr, le.Uint64(b[56:]), "castaddr")
	assert.EqualValues(t, 0x99, le.Uint64(b[64:]), "bastparam")
	assert.EqualValues(t, bastAddr, le.Uint64(b[72:]), "bastaddr")
	assert.NotZero(t, le.Uint64(b[80:]), "lksb must be non-zero")
	assert.Equal(t, lvb[:], b[88:120], "lvb")
	assert.Equal(t, "res", string(b[120:]))
}

// Without a bast parameter the request asks for no blocking notifications
// (bastaddr 0); the longest name makes the longest request the kernel
// takes, and a longer one is refused.
func TestEncodeLockLimits(t *testing.T) {
	v := version{6, 0, 2}
	b, err := encodeLock(v, cmdUnlock, lockParams{flags: lkfCancel, lkid: 7, castParam: 1})
	require.NoError(t, err)
	assert.Len(t, b, 120)
	assert.GreaterOrEqual(t, len(b), requestMinSize)
	assert.Zero(t, binary.LittleEndian.Uint64(b[72:]), "bastaddr")
	assert.Equal(t, make([]byte, 32), b[88:120], "zeroed lvb")

	b, err = encodeLock(v, cmdLock, lockParams{castParam: 1, name: make([]byte, lockc.MaxResourceName)})
	require.NoError(t, err)
	assert.Len(t, b, requestMaxSize)
	assert.Equal(t, 184, requestMaxSize)
	_, err = encodeLock(v, cmdLock, lockParams{castParam: 1, name: make([]byte, lockc.MaxResourceName+1)})
	assert.ErrorIs(t, err, lockc.ErrBadRequest)
}

// Lockspace params: flags at 16, minor at 20, the NUL-terminated name at
// 24; never shorter than the kernel's minimum write.
func TestEncodeLockspace(t *testing.T) {
	b, err := encodeLockspace(version{6, 0, 1}, cmdCreateLS, 0, 0, "csnap")
	require.NoError(t, err)
	assert.Len(t, b, requestMinSize)
	assert.EqualValues(t, cmdCreateLS, b[12])
	assert.EqualValues(t, 1, b[13])
	assert.Equal(t, "csnap\x00", string(b[24:30]))

	b, err = encodeLockspace(version{6, 0, 2}, cmdRemoveLS, lsfForceFree, 130, "")
	require.NoError(t, err)
	assert.EqualValues(t, lsfForceFree, binary.LittleEndian.Uint32(b[16:]))
	assert.EqualValues(t, 130, binary.LittleEndian.Uint32(b[20:]))

	long := string(make([]byte, 63))
	b, err = encodeLockspace(version{6, 0, 2}, cmdCreateLS, 0, 0, long)
	require.NoError(t, err)
	assert.Len(t, b, requestMinSize, "24 + 63 + NUL is below the minimum")
	assert.Equal(t, long+"\x00", string(b[24:88]))
	_, err = encodeLockspace(version{6, 0, 2}, cmdCreateLS, 0, 0, long+"x")
	assert.ErrorIs(t, err, lockc.ErrBadRequest)
	_, err = encodeLockspace(version{6, 0, 2}, cmdCreateLS, 0, 0, "")
	assert.ErrorIs(t, err, lockc.ErrBadRequest)
}

// encodeResult builds a dlm_lock_result as the kernel writes it.
func encodeResult(addr, param uint64, status int32, lkid uint32, sbFlags, bastMode uint8, lvb *lockc.LVB) []byte {
	le := binary.LittleEndian
	b := make([]byte, resultSize, resultLVBLength)
	le.PutUint32(b[0:], 6)
	le.PutUint32(b[8:], 2)
	le.PutUint64(b[16:], addr)
	le.PutUint64(b[24:], param)
	le.PutUint64(b[32:], 1)
	le.PutUint32(b[40:], uint32(status))
	le.PutUint32(b[44:], lkid)
	b[48] = sbFlags
	b[64] = bastMode
	if lvb != nil {
		le.PutUint32(b[68:], resultSize)
		b = append(b, lvb[:]...)
	}
	le.PutUint32(b[12:], uint32(len(b)))
	return b
}

func TestDecodeResult(t *testing.T) {
	lvb := lockc.LVB{1, 2, 3, 31: 9}
	r, err := decodeResult(encodeResult(castAddr, 42, 0, 0x10003, sbfValNotValid, 0, &lvb))
	require.NoError(t, err)
	assert.Equal(t, result{param: 42, lkid: 0x10003, sbFlags: sbfValNotValid, lvb: lvb, hasLVB: true}, r)

	r, err = decodeResult(encodeResult(bastAddr, 7, 0, 5, 0, uint8(lockc.EX), nil))
	require.NoError(t, err)
	assert.Equal(t, result{bast: true, param: 7, lkid: 5, mode: lockc.EX}, r)

	r, err = decodeResult(encodeResult(castAddr, 7, -11, 5, 0, 0, nil))
	require.NoError(t, err)
	assert.EqualValues(t, -11, r.status, "EAGAIN, negated")

	r, err = decodeResult(append(encodeResult(castAddr, 7, statusUnlock, 5, 0, 0, nil), make([]byte, 100)...))
	require.NoError(t, err, "bytes past length are ignored")
	assert.EqualValues(t, statusUnlock, r.status)

	for name, b := range map[string][]byte{
		"short":        make([]byte, resultSize-1),
		"version read": {6, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0},
		"bad address":  encodeResult(3, 1, 0, 1, 0, 0, nil),
		"bad mode":     encodeResult(bastAddr, 1, 0, 1, 0, 6, nil),
		"lvb past end": func() []byte {
			b := encodeResult(castAddr, 1, 0, 1, 0, 0, nil)
			binary.LittleEndian.PutUint32(b[68:], resultSize)
			return b
		}(),
		"length past read": func() []byte {
			b := encodeResult(castAddr, 1, 0, 1, 0, 0, nil)
			binary.LittleEndian.PutUint32(b[12:], resultLVBLength)
			return b
		}(),
	} {
		_, err := decodeResult(b)
		assert.ErrorIs(t, err, errBadResult, name)
	}
}

func TestParseVersion(t *testing.T) {
	v, err := parseVersion([]byte{6, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0})
	require.NoError(t, err)
	assert.Equal(t, version{6, 0, 1}, v)
	assert.True(t, v.nlToExBroken())
	assert.False(t, version{6, 0, 2}.nlToExBroken())

	_, err = parseVersion([]byte{5, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0})
	assert.ErrorIs(t, err, errBadVersion, "major 5")
	_, err = parseVersion([]byte{7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0})
	assert.ErrorIs(t, err, errBadVersion, "major 7")
	_, err = parseVersion(make([]byte, 8))
	assert.ErrorIs(t, err, errBadVersion, "short")
}

// The decoder never panics and either refuses a read or returns a result
// whose fields come from inside it.
func FuzzDecodeResult(f *testing.F) {
	lvb := lockc.LVB{5}
	f.Add(encodeResult(castAddr, 1, 0, 1, 0, 0, &lvb))
	f.Add(encodeResult(bastAddr, 1, 0, 1, 0, 5, nil))
	f.Add(make([]byte, 12))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := decodeResult(b)
		if err != nil {
			if !errors.Is(err, errBadResult) {
				t.Fatalf("error %v does not wrap errBadResult", err)
			}
			return
		}
		if len(b) < resultSize {
			t.Fatalf("decoded %d bytes", len(b))
		}
		if r.bast && r.mode > lockc.EX {
			t.Fatalf("bast mode %v", r.mode)
		}
		if r.hasLVB {
			off := binary.LittleEndian.Uint32(b[68:])
			if [32]byte(b[off:off+32]) != r.lvb {
				t.Fatalf("lvb not from offset %d", off)
			}
		}
	})
}
