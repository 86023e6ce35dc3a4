package dlm

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/clustersnap/clustersnap/lockc"
)

// The device ABI of include/uapi/linux/dlm_device.h, 64-bit layout
// (specs/locks.md §2 and §7). Every request is sent with is64bit=1, so the
// kernel parses the 64-bit layout and answers with 64-bit results.

// Commands of a dlm_write_request.
const (
	cmdLock     = 1
	cmdUnlock   = 2
	cmdCreateLS = 4
	cmdRemoveLS = 5
)

// Lock flags (DLM_LKF_*).
const (
	lkfNoQueue     = 0x1
	lkfCancel      = 0x2
	lkfConvert     = 0x4
	lkfValBlk      = 0x8
	lkfQueCvt      = 0x10
	lkfIVValBlk    = 0x20
	lkfExpedite    = 0x400
	lkfNoOrder     = 0x2000
	lkfForceUnlock = 0x20000
)

// Lockspace remove flags.
const lsfForceFree = 0x2

// Status codes of DLM results besides negated errnos.
const (
	statusCancel = -0x10001 // -DLM_ECANCEL
	statusUnlock = -0x10002 // -DLM_EUNLOCK
)

// sb_flags of a result.
const (
	sbfDemoted     = 0x1
	sbfValNotValid = 0x2
)

// Layout sizes and offsets.
const (
	versionSize     = 12  // struct dlm_device_version
	requestHeader   = 16  // version, cmd, is64bit, pad
	lockParamsSize  = 104 // struct dlm_lock_params without the name
	requestMinSize  = 104 // the 32-bit request size: the kernel's minimum
	requestMaxSize  = requestHeader + lockParamsSize + lockc.MaxResourceName
	lsNameOffset    = requestHeader + 8
	lsNameMax       = 64 // DLM_LOCKSPACE_LEN
	resultSize      = 72 // struct dlm_lock_result
	resultReadSize  = 256
	lockNameOffset  = requestHeader + 104
	lockLVBOffset   = requestHeader + 72
	resultLVBLength = resultSize + lockc.LVBSize
)

// Sentinel addresses echoed by the kernel in a result's astaddr: they tell
// a completion from a blocking notification. The kernel never dereferences
// them.
const (
	castAddr = 1
	bastAddr = 2
)

// version is a device ABI version.
type version [3]uint32

func (v version) String() string { return fmt.Sprintf("%d.%d.%d", v[0], v[1], v[2]) }

// errBadVersion: the kernel speaks a device ABI this package does not.
var errBadVersion = errors.New("unsupported DLM device ABI")

// parseVersion decodes the 12 bytes read from a DLM device and checks that
// the major version is 6.
func parseVersion(b []byte) (version, error) {
	if len(b) != versionSize {
		return version{}, fmt.Errorf("DLM version: read %d bytes, want %d: %w", len(b), versionSize, errBadVersion)
	}
	var v version
	for i := range v {
		v[i] = binary.LittleEndian.Uint32(b[4*i:])
	}
	if v[0] != 6 {
		return v, fmt.Errorf("DLM device ABI %v, want 6.x: %w", v, errBadVersion)
	}
	return v, nil
}

// nlToExBroken reports whether v is ABI 6.0.1, whose NL→EX conversion may
// not return the latest LVB (lvmlockd's reason to go NL→PR→EX).
func (v version) nlToExBroken() bool { return v == version{6, 0, 1} }

// header writes a request header for cmd into b.
func header(b []byte, v version, cmd uint8) {
	for i, x := range v {
		binary.LittleEndian.PutUint32(b[4*i:], x)
	}
	b[12] = cmd
	b[13] = 1 // is64bit
}

// lockParams are the fields of a lock or unlock request.
type lockParams struct {
	mode      lockc.Mode
	flags     uint32
	lkid      uint32
	castParam uint64
	bastParam uint64 // 0: no blocking notifications
	lvb       lockc.LVB
	name      []byte
}

// encodeLock returns a LOCK or UNLOCK request (cmd) for p: zeroed, at
// least requestMinSize bytes, with the name at lockNameOffset.
func encodeLock(v version, cmd uint8, p lockParams) ([]byte, error) {
	if len(p.name) > lockc.MaxResourceName {
		return nil, fmt.Errorf("resource name of %d bytes: %w", len(p.name), lockc.ErrBadRequest)
	}
	b := make([]byte, lockNameOffset+len(p.name))
	header(b, v, cmd)
	l := b[requestHeader:]
	l[0] = byte(p.mode)
	l[1] = byte(len(p.name))
	binary.LittleEndian.PutUint32(l[4:], p.flags)
	binary.LittleEndian.PutUint32(l[8:], p.lkid)
	binary.LittleEndian.PutUint64(l[32:], p.castParam)
	binary.LittleEndian.PutUint64(l[40:], castAddr)
	if p.bastParam != 0 {
		binary.LittleEndian.PutUint64(l[48:], p.bastParam)
		binary.LittleEndian.PutUint64(l[56:], bastAddr)
	}
	// The lksb pointer must be non-zero; the kernel only echoes it.
	binary.LittleEndian.PutUint64(l[64:], 1)
	copy(l[72:], p.lvb[:])
	copy(b[lockNameOffset:], p.name)
	return b, nil
}

// encodeLockspace returns a CREATE_LS or REMOVE_LS request.
func encodeLockspace(v version, cmd uint8, flags, minor uint32, name string) ([]byte, error) {
	if cmd == cmdCreateLS && (name == "" || len(name) >= lsNameMax) {
		return nil, fmt.Errorf("lockspace name %q: 1 to %d bytes: %w", name, lsNameMax-1, lockc.ErrBadRequest)
	}
	b := make([]byte, max(requestMinSize, lsNameOffset+len(name)+1))
	header(b, v, cmd)
	binary.LittleEndian.PutUint32(b[requestHeader:], flags)
	binary.LittleEndian.PutUint32(b[requestHeader+4:], minor)
	copy(b[lsNameOffset:], name)
	return b, nil
}

// result is a decoded dlm_lock_result.
type result struct {
	bast    bool   // a blocking notification, not a completion
	param   uint64 // castparam or bastparam
	status  int32  // 0 granted, or a negated errno or DLM status
	lkid    uint32
	sbFlags uint8
	mode    lockc.Mode // the blocking mode of a bast
	lvb     lockc.LVB
	hasLVB  bool
}

// errBadResult: a read returned something that is not a dlm_lock_result.
var errBadResult = errors.New("malformed DLM result")

// decodeResult decodes one read from a lockspace device.
func decodeResult(b []byte) (result, error) {
	if len(b) < resultSize {
		return result{}, fmt.Errorf("%d bytes: %w", len(b), errBadResult)
	}
	var r result
	length := binary.LittleEndian.Uint32(b[12:])
	if length < resultSize || int(length) > len(b) {
		return result{}, fmt.Errorf("length %d of %d bytes read: %w", length, len(b), errBadResult)
	}
	switch addr := binary.LittleEndian.Uint64(b[16:]); addr {
	case castAddr:
	case bastAddr:
		r.bast = true
	default:
		return result{}, fmt.Errorf("ast address %#x: %w", addr, errBadResult)
	}
	r.param = binary.LittleEndian.Uint64(b[24:])
	r.status = int32(binary.LittleEndian.Uint32(b[40:]))
	r.lkid = binary.LittleEndian.Uint32(b[44:])
	r.sbFlags = b[48]
	if r.bast {
		m := b[64]
		if m > byte(lockc.EX) {
			return result{}, fmt.Errorf("blocking mode %d: %w", m, errBadResult)
		}
		r.mode = lockc.Mode(m)
	}
	if off := binary.LittleEndian.Uint32(b[68:]); off != 0 {
		if off < resultSize || int(off)+lockc.LVBSize > int(length) {
			return result{}, fmt.Errorf("LVB at %d of length %d: %w", off, length, errBadResult)
		}
		copy(r.lvb[:], b[off:])
		r.hasLVB = true
	}
	return r, nil
}
