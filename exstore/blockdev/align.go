package blockdev

import (
	"fmt"
	"unsafe"
)

// AlignedBuffer returns a zeroed slice of length and capacity size whose first
// byte is at an address that is a multiple of align, as O_DIRECT I/O needs.
// align must be a power of two; 1 gives a plain slice. It panics on an invalid
// align or a negative size, which are programming errors.
func AlignedBuffer(size, align int) []byte {
	if size < 0 {
		panic(fmt.Sprintf("blockdev.AlignedBuffer: negative size %d", size))
	}
	if align < 1 || align&(align-1) != 0 {
		panic(fmt.Sprintf("blockdev.AlignedBuffer: alignment %d is not a power of two", align))
	}
	if align == 1 {
		return make([]byte, size)
	}
	// Over-allocate and slice from the first aligned address; the Go heap
	// does not move objects, so the alignment holds for the slice's lifetime.
	raw := make([]byte, size+align-1)
	addr := uintptr(unsafe.Pointer(unsafe.SliceData(raw)))
	skip := int((uintptr(align) - addr%uintptr(align)) % uintptr(align))
	return raw[skip : skip+size : skip+size]
}

// isAligned reports whether p starts at a multiple of align in memory.
func isAligned(p []byte, align int) bool {
	if len(p) == 0 {
		return true
	}
	return uintptr(unsafe.Pointer(unsafe.SliceData(p)))%uintptr(align) == 0
}
