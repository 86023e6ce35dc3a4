package nbd

import (
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
)

// Attaching needs root and the nbd module (test/nbdkernel boots a guest
// for that); opening can be refused anywhere.
func TestOpenKernelDeviceRefusals(t *testing.T) {
	_, err := OpenKernelDevice(filepath.Join(t.TempDir(), "nbd0"))
	assert.ErrorContains(t, err, "no such device")
	assert.ErrorContains(t, err, "nbd", "says how to get nbd devices")

	_, err = OpenKernelDevice("/dev/null")
	assert.ErrorContains(t, err, "/dev/null: not an nbd device")

	_, path := fileDevice(t, 4096)
	_, err = OpenKernelDevice(path)
	assert.ErrorContains(t, err, "not an nbd device")
}
