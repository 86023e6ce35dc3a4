package control

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/clustersnap/clustersnap/nbd"
)

// Handler answers one op: its result is marshalled as the reply's result.
// args is the request's raw "args" (nil when absent). An error becomes an
// error reply (see Error for choosing its code).
type Handler func(ctx context.Context, args json.RawMessage) (any, error)

// Server answers requests with its handlers, by op name.
type Server struct {
	handlers map[string]Handler
}

// NewServer returns a server for the ops in handlers.
func NewServer(handlers map[string]Handler) *Server {
	h := make(map[string]Handler, len(handlers))
	for op, f := range handlers {
		h[op] = f
	}
	return &Server{handlers: h}
}

// Listen creates the control socket at path, mode 0600. A socket file no
// server answers on (left by a crash) is replaced; a live one, or a file
// that is not a socket, is refused.
func Listen(path string) (net.Listener, error) {
	ln, err := nbd.ListenUnix(path)
	if err != nil {
		return nil, fmt.Errorf("control %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	return ln, nil
}

// Serve answers connections on ln until ctx ends or ln fails; it closes ln
// and every connection, and returns once their handlers have returned.
// It returns nil when ctx ended.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	defer wg.Wait()
	go func() {
		<-ctx.Done()
		ln.Close()
	}()
	for {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("control: accept: %w", err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.serveConn(ctx, conn)
		}()
	}
}

// serveConn answers one connection's requests in turn.
func (s *Server) serveConn(ctx context.Context, conn net.Conn) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	defer conn.Close()
	if err := checkPeer(conn); err != nil {
		_ = writeReply(conn, errorReply(&Error{Code: CodeBadRequest, Msg: err.Error()}))
		return
	}
	r := bufio.NewReader(conn)
	for {
		line, err := readLine(r)
		if err != nil {
			return // hung up, or a line too long: close
		}
		if err := writeReply(conn, s.answer(ctx, line)); err != nil {
			return
		}
	}
}

// answer runs one request line's handler.
func (s *Server) answer(ctx context.Context, line []byte) reply {
	req, err := parseRequest(line)
	if err != nil {
		return errorReply(err)
	}
	h, ok := s.handlers[req.Op]
	if !ok {
		return errorReply(&Error{Code: CodeUnknownOp, Msg: fmt.Sprintf("op %q", req.Op)})
	}
	res, err := h(ctx, req.Args)
	if err != nil {
		return errorReply(err)
	}
	b, err := json.Marshal(res)
	if err != nil {
		return errorReply(fmt.Errorf("op %s: encode the result: %w", req.Op, err))
	}
	return reply{Version: Version, OK: true, Result: b}
}

// errTooLong is a line past MaxMessage.
var errTooLong = errors.New("control: message too long")

// readLine reads one line of at most MaxMessage bytes, without its newline.
func readLine(r *bufio.Reader) ([]byte, error) {
	var line []byte
	for {
		chunk, err := r.ReadSlice('\n')
		line = append(line, chunk...)
		switch {
		case err == nil && len(line) > MaxMessage:
			return nil, errTooLong
		case err == nil:
			return bytes.TrimSuffix(line[:len(line)-1], []byte("\r")), nil
		case errors.Is(err, bufio.ErrBufferFull):
			if len(line) >= MaxMessage { // its newline would be one too many
				return nil, errTooLong
			}
			continue
		case errors.Is(err, io.EOF) && len(line) > 0:
			return nil, io.ErrUnexpectedEOF
		default:
			return nil, err
		}
	}
}

// writeReply writes one reply line.
func writeReply(w io.Writer, r reply) error {
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	_, err = w.Write(append(b, '\n'))
	return err
}

// checkPeer admits a unix connection from this process's user or root.
func checkPeer(conn net.Conn) error {
	uc, ok := conn.(*net.UnixConn)
	if !ok {
		return nil // not a unix socket (tests over pipes): the listener's rights decide
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return fmt.Errorf("peer credentials: %w", err)
	}
	var cred *unix.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return fmt.Errorf("peer credentials: %w", err)
	}
	if credErr != nil {
		return fmt.Errorf("peer credentials: %w", credErr)
	}
	if cred.Uid != uint32(os.Getuid()) && cred.Uid != 0 {
		return fmt.Errorf("uid %d may not use this server's control socket (only uid %d and root)", cred.Uid, os.Getuid())
	}
	return nil
}
