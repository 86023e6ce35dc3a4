package control

import (
	"bufio"
	"context"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

type echoArgs struct {
	Text string `json:"text"`
}

// start serves handlers on a socket in a temporary directory until the
// test ends.
func start(t *testing.T, handlers map[string]Handler) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "control.sock")
	ln, err := Listen(path)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- NewServer(handlers).Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		require.NoError(t, <-done)
	})
	return path
}

func testHandlers() map[string]Handler {
	return map[string]Handler{
		"echo": func(ctx context.Context, raw json.RawMessage) (any, error) {
			var a echoArgs
			if err := json.Unmarshal(raw, &a); err != nil || a.Text == "" {
				return nil, BadRequest("echo wants {\"text\": non-empty}")
			}
			return a, nil
		},
		"fail": func(ctx context.Context, raw json.RawMessage) (any, error) {
			return nil, os.ErrPermission
		},
	}
}

func TestCall(t *testing.T) {
	path := start(t, testHandlers())
	ctx := t.Context()
	c, err := Dial(ctx, path)
	require.NoError(t, err)
	defer c.Close()
	var got echoArgs
	require.NoError(t, c.Call(ctx, "echo", echoArgs{Text: "hi"}, &got))
	assert.Equal(t, "hi", got.Text)

	var ce *Error
	err = c.Call(ctx, "echo", nil, nil)
	require.ErrorAs(t, err, &ce)
	assert.Equal(t, CodeBadRequest, ce.Code)
	err = c.Call(ctx, "nope", nil, nil)
	require.ErrorAs(t, err, &ce)
	assert.Equal(t, CodeUnknownOp, ce.Code)
	err = c.Call(ctx, "fail", nil, nil)
	require.ErrorAs(t, err, &ce)
	assert.Equal(t, CodeFailed, ce.Code)
	assert.Contains(t, ce.Msg, "permission denied")

	// Refusals changed nothing: the connection still answers.
	require.NoError(t, c.Call(ctx, "echo", echoArgs{Text: "again"}, &got))
	assert.Equal(t, "again", got.Text)
}

// raw sends lines on a fresh connection and returns the replies read.
func raw(t *testing.T, path string, lines ...string) []reply {
	t.Helper()
	conn, err := net.Dial("unix", path)
	require.NoError(t, err)
	defer conn.Close()
	r := bufio.NewReader(conn)
	var out []reply
	for _, l := range lines {
		_, err := conn.Write([]byte(l + "\n"))
		require.NoError(t, err)
		b, err := readLine(r)
		require.NoError(t, err, "reply to %q", l)
		var rep reply
		require.NoError(t, json.Unmarshal(b, &rep))
		out = append(out, rep)
	}
	return out
}

func TestMalformedRequests(t *testing.T) {
	path := start(t, testHandlers())
	reps := raw(t, path,
		`{not json`,
		`{"version":2,"op":"echo","args":{"text":"x"}}`,
		`{"version":1}`,
		`{"version":1,"op":"echo","args":[1,2]}`,
		`{"version":1,"op":"echo","args":{"text":"ok"}}`,
	)
	want := []Code{CodeBadRequest, CodeUnsupportedVersion, CodeBadRequest, CodeBadRequest, ""}
	for i, rep := range reps {
		assert.Equal(t, Version, rep.Version, "reply %d", i)
		assert.Equal(t, want[i] == "", rep.OK, "reply %d", i)
		assert.Equal(t, want[i], rep.Code, "reply %d: %s", i, rep.Error)
	}
}

func TestTooLongClosesConnection(t *testing.T) {
	path := start(t, testHandlers())
	conn, err := net.Dial("unix", path)
	require.NoError(t, err)
	defer conn.Close()
	go conn.Write([]byte(strings.Repeat("x", MaxMessage+10)))
	_, err = readLine(bufio.NewReader(conn))
	assert.Error(t, err, "the server closes instead of replying")

	// Other connections are served.
	assert.True(t, raw(t, path, `{"version":1,"op":"echo","args":{"text":"y"}}`)[0].OK)
}

func TestListen(t *testing.T) {
	dir := t.TempDir()
	path := start(t, testHandlers())
	fi, err := os.Stat(path)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())

	_, err = Listen(path)
	assert.ErrorContains(t, err, "another server answers")

	file := filepath.Join(dir, "file")
	require.NoError(t, os.WriteFile(file, nil, 0o600))
	_, err = Listen(file)
	assert.ErrorContains(t, err, "not a socket")

	// A stale socket (its server gone without removing it) is replaced.
	stale := filepath.Join(dir, "stale.sock")
	ln, err := net.Listen("unix", stale)
	require.NoError(t, err)
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	ln, err = Listen(stale)
	require.NoError(t, err)
	ln.Close()
}

// Serve returns only after the handlers in flight return, and their
// context ends when the server stops.
func TestServeStopsHandlers(t *testing.T) {
	path := filepath.Join(t.TempDir(), "c.sock")
	ln, err := Listen(path)
	require.NoError(t, err)
	entered, left := make(chan struct{}), make(chan struct{})
	h := map[string]Handler{"wait": func(ctx context.Context, _ json.RawMessage) (any, error) {
		close(entered)
		<-ctx.Done()
		close(left)
		return nil, ctx.Err()
	}}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- NewServer(h).Serve(ctx, ln) }()
	c, err := Dial(t.Context(), path)
	require.NoError(t, err)
	defer c.Close()
	callErr := make(chan error, 1)
	go func() { callErr <- c.Call(t.Context(), "wait", nil, nil) }()
	<-entered
	cancel()
	require.NoError(t, <-done)
	select {
	case <-left:
	default:
		t.Fatal("Serve returned before the handler did")
	}
	assert.Error(t, <-callErr)
	assert.Error(t, c.Call(t.Context(), "wait", nil, nil), "a broken client stays broken")
}

// FuzzAnswer: any request line gets a reply of this version, and never a
// panic.
func FuzzAnswer(f *testing.F) {
	for _, s := range []string{
		`{"version":1,"op":"echo","args":{"text":"x"}}`,
		`{"version":1,"op":"echo","args":null}`,
		`{"version":0}`, `[]`, `null`, `{"version":1,"op":"\u0000"}`, "\xff",
	} {
		f.Add([]byte(s))
	}
	s := NewServer(testHandlers())
	f.Fuzz(func(t *testing.T, line []byte) {
		rep := s.answer(context.Background(), line)
		if rep.Version != Version {
			t.Fatalf("reply version %d", rep.Version)
		}
		if !rep.OK && rep.Code == "" {
			t.Fatalf("an error reply without a code: %+v", rep)
		}
	})
}
