package guest

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestMachine starts a guest that stays up, watches its console, kills it
// and checks what a killed guest reports.
func TestMachine(t *testing.T) {
	r := Setup(t, Config{})
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	m, err := r.Start(ctx, Options{Script: "echo machine-ready\nmkfifo /tmp/idle\nread x </tmp/idle\n"})
	require.NoError(t, err)
	require.NoError(t, m.WaitBooted(ctx))
	require.NoError(t, m.WaitConsole(ctx, "machine-ready"))

	short, stop := context.WithTimeout(ctx, 100*time.Millisecond)
	err = m.WaitConsole(short, "never printed")
	stop()
	assert.ErrorIs(t, err, context.DeadlineExceeded, "the guest is still up")

	m.Kill()
	select {
	case <-m.Done():
	default:
		t.Fatalf("Done open after Kill returned")
	}
	res, err := m.Wait(ctx)
	assert.True(t, errors.Is(err, ErrNoEndMarker), "a killed guest has no end marker: %v", err)
	assert.Contains(t, res.Console, "machine-ready")
	err = m.WaitConsole(ctx, "never printed")
	assert.ErrorContains(t, err, "exited before printing")
}
