package dlmtest

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Seen in a guest (kernel 6.1): the probe resource with a binary name,
// then "r" with a granted PR and an NL converting to EX.
const debugfsAll = `version rsb 1.1 lvb 1.1 lkb 1.1
rsb 00000000a1b2c3d4 0 0 0 0 0 0 25 hex ff 6c 6f 63 6b 63 2f 64 6c 6d 20 6c 69 76 65 6e 65 73 73 20 70 72 6f 62 65
lkb 3 0 0 100 0 408 1 2 0 -1 0 0 0 0 2714935126 0
lkb 1 0 0 100 0 408 1 2 0 -1 0 0 0 0 2697755983 0
rsb 00000000a1b2c3d5 0 0 0 0 0 0 1 str r
lvb 1 32 01 02 03 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
lkb 4 0 0 100 0 8 1 2 3 -1 5 0 0 1 2715375372 2717055727
lkb 2 0 0 100 0 c 1 3 0 5 0 0 0 1 2716748292 0
lkb 5 0 0 100 0 8 1 1 -1 3 0 0 0 1 2716748292 0
rsb 00000000a1b2c3d6 0 0 0 0 0 0 3 str a b
lkb 6 0 0 100 0 8 1 1 -1 3 0 0 0 1 2716748292 0
`

func TestParseQueues(t *testing.T) {
	for _, tc := range []struct {
		name                string
		converting, waiting int
	}{
		{"r", 1, 1},
		{"a b", 0, 1},
		{"\xfflockc/dlm liveness probe", 0, 0},
		{"absent", 0, 0},
		{"a", 0, 0},
	} {
		cv, w, err := parseQueues([]byte(debugfsAll), []byte(tc.name))
		require.NoError(t, err, tc.name)
		assert.Equal(t, tc.converting, cv, "%q converting", tc.name)
		assert.Equal(t, tc.waiting, w, "%q waiting", tc.name)
	}
	_, _, err := parseQueues([]byte("rsb 1 2\n"), []byte("r"))
	assert.Error(t, err, "a truncated rsb line")
}
