package lockagent

import (
	"context"
	"errors"

	"github.com/clustersnap/clustersnap/lockc"
)

// op is what a request asks the server to do.
type op uint8

const (
	opOpen op = iota + 1
	opLock
	opConvert
	opUnlock
	opSetLVB
	opInvalidateLVB
	opClose
	opCancel
	opCrash
	opWaitQueueLen
	opResourceCount
)

// request is one client-to-server frame. ID numbers the call; its reply
// carries the same ID. opCancel carries the ID of the call to cancel in
// Target and gets no reply of its own.
type request struct {
	ID       uint64
	Op       op
	Node     uint32
	Space    uint64 // the lockspace's handle
	Lock     uint64 // the lock's handle
	Name     string // the lockspace's name (opOpen, opWaitQueueLen)
	Resource []byte
	Mode     lockc.Mode
	Flags    []lockc.Flag
	LVB      lockc.LVB
	Target   uint64 // opCancel: the call to cancel
	// Ended says the caller's context had ended before the call was sent:
	// the server runs the call with an ended context too.
	Ended bool
	// Converting and Waiting are opWaitQueueLen's queue lengths.
	Converting, Waiting int
}

// kind is what a server-to-client frame is.
type kind uint8

const (
	kindHello    kind = iota + 1 // the first frame: the server's name and capabilities
	kindReply                    // the end of a call
	kindBlocking                 // a blocking notification for a lock
	kindLost                     // a lockspace was lost
)

// message is one server-to-client frame.
type message struct {
	Kind  kind
	ID    uint64 // kindReply: the call
	Err   *wireError
	Space uint64 // kindLost, opOpen's reply: the lockspace's handle
	Lock  uint64 // kindBlocking, opLock's reply: the lock's handle
	// The lock's state after the call (opLock, opConvert, opSetLVB,
	// opInvalidateLVB) or a blocking notification's mode.
	HasState bool // Mode, LVB, LVBState and Token hold a lock's state
	Mode     lockc.Mode
	LVB      lockc.LVB
	LVBState lockc.LVBState
	HasToken bool
	Token    uint64
	Count    int    // opResourceCount
	Node     uint32 // opOpen's reply: the node that opened the lockspace
	// NewSpace and NewLock mark the replies of opOpen and opLock: the
	// client's read loop makes the lockspace or lock before it reads the
	// next frame, which may be its loss or a blocking notification.
	NewSpace, NewLock bool
	space             *space // made by the client's read loop
	lock              *lock  // made by the client's read loop
	Name              string // kindHello: the server's name
	Caps              caps   // kindHello
}

// caps are the optional test operations a server offers.
type caps struct {
	Crash, QueueLen, ResourceCount bool
}

// code names the lockc sentinel (or context error) a remote error wraps.
type code uint8

const (
	codeOther code = iota
	codeWouldBlock
	codeDeadlock
	codeBusy
	codeLost
	codeUnlocked
	codeBadRequest
	codeCanceled
	codeDeadline
)

// sentinels pairs codes with the errors they stand for, in the order a
// server tests them.
func sentinels() []sentinel {
	return []sentinel{
		{codeCanceled, context.Canceled},
		{codeDeadline, context.DeadlineExceeded},
		{codeLost, lockc.ErrLost},
		{codeUnlocked, lockc.ErrUnlocked},
		{codeWouldBlock, lockc.ErrWouldBlock},
		{codeDeadlock, lockc.ErrDeadlock},
		{codeBusy, lockc.ErrBusy},
		{codeBadRequest, lockc.ErrBadRequest},
	}
}

// sentinel is an error a code stands for.
type sentinel struct {
	code code
	err  error
}

// wireError is an error as it crosses the stream: the remote text, and the
// sentinel it wrapped, so that errors.Is works on the client.
type wireError struct {
	Code code
	Text string
}

func (e *wireError) Error() string { return e.Text }

// Unwrap returns the sentinel the remote error wrapped.
func (e *wireError) Unwrap() error {
	for _, s := range sentinels() {
		if s.code == e.Code {
			return s.err
		}
	}
	return nil
}

// toWire encodes err; nil stays nil.
func toWire(err error) *wireError {
	if err == nil {
		return nil
	}
	for _, s := range sentinels() {
		if errors.Is(err, s.err) {
			return &wireError{Code: s.code, Text: err.Error()}
		}
	}
	return &wireError{Code: codeOther, Text: err.Error()}
}

// fromWire decodes e; nil stays nil.
func fromWire(e *wireError) error {
	if e == nil {
		return nil
	}
	return e
}
