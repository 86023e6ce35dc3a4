package nbd

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// syncBuffer is a bytes.Buffer the server's goroutines and the test share.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

// records returns the JSON log records written so far.
func (s *syncBuffer) records(t *testing.T) []map[string]any {
	s.mu.Lock()
	defer s.mu.Unlock()
	var recs []map[string]any
	for _, line := range bytes.Split(bytes.TrimSpace(s.b.Bytes()), []byte("\n")) {
		if len(line) == 0 {
			continue
		}
		var r map[string]any
		require.NoError(t, json.Unmarshal(line, &r))
		recs = append(recs, r)
	}
	return recs
}

// With the default options the server takes READ and WRITE requests of up
// to 64 MiB from a client that never asked for block sizes (the NBD
// project's nbd-tester-client sends about 48 MiB), refuses a byte more
// with EINVAL on a live connection, and logs the refusal at debug level
// with its reason.
func TestDefaultPayloadServesLargeUnnegotiatedRequests(t *testing.T) {
	const size = 96 << 20
	var logs syncBuffer
	srv := NewServer([]Export{{Name: "big", Backend: newMemBackend(size)}},
		Options{Logger: slog.New(slog.NewJSONHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	rc := transmitting(t, srv, "big", false)

	const large = 48 << 20
	data := bytes.Repeat([]byte("0123456789abcdef"), large/16)
	rc.sendRequest(0, cmdWrite, 1, 4096, large, data)
	errno, cookie := rc.readSimpleReply()
	require.Equal(t, uint32(0), errno, "a 48 MiB write")
	require.Equal(t, uint64(1), cookie)
	rc.sendRequest(0, cmdRead, 2, 4096, large, nil)
	errno, _ = rc.readSimpleReply()
	require.Equal(t, uint32(0), errno, "a 48 MiB read")
	got := make([]byte, large)
	rc.read(got)
	require.True(t, bytes.Equal(data, got), "the 48 MiB read returns the write")

	rc.sendRequest(0, cmdRead, 3, 0, DefaultMaxPayload, nil)
	errno, _ = rc.readSimpleReply()
	require.Equal(t, uint32(0), errno, "a read of exactly 64 MiB")
	rc.read(make([]byte, DefaultMaxPayload))
	rc.sendRequest(0, cmdRead, 4, 0, DefaultMaxPayload+1, nil)
	errno, cookie = rc.readSimpleReply()
	assert.Equal(t, errInval, errno, "a byte over 64 MiB")
	assert.Equal(t, uint64(4), cookie)
	rc.sendRequest(0, cmdRead, 5, size, 512, nil)
	errno, _ = rc.readSimpleReply()
	assert.Equal(t, errInval, errno, "past the end")
	rc.sendRequest(0, cmdFlush, 6, 0, 0, nil)
	errno, _ = rc.readSimpleReply()
	require.Equal(t, uint32(0), errno, "the connection goes on")

	var reasons []string
	for _, r := range logs.records(t) {
		if r["msg"] == "nbd request refused" {
			assert.Equal(t, "DEBUG", r["level"])
			assert.Equal(t, "big", r["export"])
			reasons = append(reasons, r["reason"].(string))
		}
	}
	require.Len(t, reasons, 2, "each refused request is logged once")
	assert.Contains(t, reasons[0], "maximum payload of 67108864 bytes")
	assert.Contains(t, reasons[1], "past the export's end")
}
