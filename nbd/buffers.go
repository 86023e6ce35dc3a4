package nbd

import (
	"math/bits"
	"sync"

	"github.com/clustersnap/clustersnap/exstore/blockdev"
)

// Payload buffers are pooled per power-of-two size class from 4 KiB up, and
// aligned for O_DIRECT devices.
const (
	minBufferShift = 12
	bufferAlign    = 4096
)

// bufferPools holds the size classes of one server.
type bufferPools struct {
	classes []sync.Pool
}

func newBufferPools(maxPayload int) bufferPools {
	return bufferPools{classes: make([]sync.Pool, bufferClass(maxPayload)+1)}
}

// bufferClass is the size class holding n bytes.
func bufferClass(n int) int {
	if n <= 1<<minBufferShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minBufferShift
}

// getBuffer returns a buffer of at least n bytes, sliced to n.
func (s *Server) getBuffer(n int) *[]byte {
	class := bufferClass(n)
	if b, ok := s.buffers.classes[class].Get().(*[]byte); ok {
		*b = (*b)[:n]
		return b
	}
	b := blockdev.AlignedBuffer(1<<(class+minBufferShift), bufferAlign)[:n]
	return &b
}

// putBuffer returns a buffer from getBuffer to its pool.
func (s *Server) putBuffer(b *[]byte) {
	*b = (*b)[:cap(*b)]
	s.buffers.classes[bufferClass(cap(*b))].Put(b)
}
