package control

import (
	"encoding/json"
	"errors"
	"fmt"
)

// Version is the protocol version this package speaks.
const Version = 1

// MaxMessage bounds one request or reply line, newline included.
const MaxMessage = 1 << 20

// Code classifies an error reply.
type Code string

const (
	// CodeBadRequest: the request is malformed or its arguments are wrong.
	CodeBadRequest Code = "bad-request"
	// CodeUnsupportedVersion: the server does not speak the request's
	// version.
	CodeUnsupportedVersion Code = "unsupported-version"
	// CodeUnknownOp: the server has no such op.
	CodeUnknownOp Code = "unknown-op"
	// CodeFailed: the op was valid but failed.
	CodeFailed Code = "failed"
)

// request is one request line.
type request struct {
	Version int             `json:"version"`
	Op      string          `json:"op"`
	Args    json.RawMessage `json:"args,omitempty"`
}

// reply is one reply line.
type reply struct {
	Version int             `json:"version"`
	OK      bool            `json:"ok"`
	Result  json.RawMessage `json:"result,omitempty"`
	Code    Code            `json:"code,omitempty"`
	Error   string          `json:"error,omitempty"`
}

// Error is an error reply, on either side: a handler returns one (through
// Errorf or BadRequest) to choose its code, and the client returns the one
// it received.
type Error struct {
	Code Code
	Msg  string
}

func (e *Error) Error() string { return fmt.Sprintf("%s: %s", e.Code, e.Msg) }

// BadRequest is a handler's refusal of its arguments.
func BadRequest(format string, args ...any) error {
	return &Error{Code: CodeBadRequest, Msg: fmt.Sprintf(format, args...)}
}

// parseRequest decodes one request line; a malformed one is an *Error
// with CodeBadRequest or CodeUnsupportedVersion.
func parseRequest(line []byte) (request, error) {
	var r request
	if err := json.Unmarshal(line, &r); err != nil {
		return r, &Error{Code: CodeBadRequest, Msg: fmt.Sprintf("not a JSON request: %v", err)}
	}
	if r.Version != Version {
		return r, &Error{Code: CodeUnsupportedVersion, Msg: fmt.Sprintf("version %d (this server speaks %d)", r.Version, Version)}
	}
	if r.Op == "" {
		return r, &Error{Code: CodeBadRequest, Msg: "no op"}
	}
	return r, nil
}

// errorReply is the reply for err: its own code if it is an *Error,
// CodeFailed otherwise.
func errorReply(err error) reply {
	var ce *Error
	if errors.As(err, &ce) {
		return reply{Version: Version, Code: ce.Code, Error: ce.Msg}
	}
	return reply{Version: Version, Code: CodeFailed, Error: err.Error()}
}
