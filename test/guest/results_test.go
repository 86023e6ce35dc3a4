package guest

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestResults(t *testing.T) {
	out := "boot noise\nresult sha abc123\r\nresult status \"3800/24576 24\"\nresultless line\nresult empty\n"
	assert.Equal(t, map[string]string{"sha": "abc123", "status": "3800/24576 24", "empty": ""}, Results(out))
}
