package solo

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestParseUevent(t *testing.T) {
	msg := "online@/kernel/dlm/csnap\x00ACTION=online\x00DEVPATH=/kernel/dlm/csnap\x00SUBSYSTEM=dlm\x00LOCKSPACE=csnap\x00SEQNUM=1234\x00"
	action, ls, ok := parseUevent([]byte(msg))
	assert.True(t, ok)
	assert.Equal(t, "online", action)
	assert.Equal(t, "csnap", ls)

	_, _, ok = parseUevent([]byte("add@/devices/virtual/misc/dlm_csnap\x00ACTION=add\x00SUBSYSTEM=misc\x00DEVNAME=dlm_csnap\x00"))
	assert.False(t, ok, "not a DLM lockspace event")
	_, _, ok = parseUevent([]byte("libudev\x00\xfe\xed"))
	assert.False(t, ok, "udev's own messages")
	_, _, ok = parseUevent(nil)
	assert.False(t, ok)
}
