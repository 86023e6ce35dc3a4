package dlmcluster

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/clustersnap/clustersnap/test/guest"
	"github.com/stretchr/testify/require"
)

// TestJoin forms the cluster and has every guest join one lockspace with
// dlm_tool, which must list all three members.
func TestJoin(t *testing.T) {
	r := guest.DLMSetup(t, guest.Config{})
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	start := time.Now()
	c, err := guest.StartDLMCluster(ctx, r, guest.DLMClusterOptions{
		Nodes: 3,
		Script: func(i int) string {
			return fmt.Sprintf(`dlm_tool join csnap || exit 1
t=0
until dlm_tool ls | grep -q 'members *1 2 3'; do
	t=$((t + 1)); [ $t -le 600 ] || { dlm_tool ls; exit 1; }
	sleep 0.2
done
dlm_tool ls
echo "@@members-ok %d@@"
mkfifo /tmp/idle; read x </tmp/idle
`, i)
		},
	})
	require.NoError(t, err)
	defer c.Close()
	t.Logf("cluster ready after %v", time.Since(start))
	for i := 1; i <= 3; i++ {
		require.NoError(t, c.Machine(i).WaitConsole(ctx, fmt.Sprintf("@@members-ok %d@@", i)))
	}
	t.Logf("lockspace joined by 1 2 3 after %v", time.Since(start))
	t.Log(c.Machine(1).Console())
}
