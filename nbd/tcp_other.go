//go:build !linux

package nbd

import "io"

// tcpSocket stands for the Linux tuning of a connection's TCP socket, which
// other systems go without: newTCPSocket finds none, so payloads are read
// through the stream without a low-water mark and large replies written with
// one writev.
type tcpSocket struct{}

// newTCPSocket reports that no socket tuning is available.
func newTCPSocket(io.ReadWriter) *tcpSocket { return nil }

// readPayload reads nothing; done is false so that the caller reads p.
func (*tcpSocket) readPayload(*conn, []byte) (done bool, err error) { return false, nil }

// writeLarge writes nothing; done is false so that the caller writes.
func (*tcpSocket) writeLarge(tx, hdr, data []byte) (done bool, err error) { return false, nil }
