package clusterload

import (
	"os"
	"strconv"
	"testing"

	"github.com/stretchr/testify/require"
)

// Env returns the seed and the number of kills of a run: seed 18 and
// defaultKills unless the environment says otherwise: CLUSTERSNAP_SEED
// sets the seed, CLUSTERSNAP_SOAK_KILLS=N the kills (for a soak).
func Env(tb testing.TB, defaultKills int) (seed uint64, kills int) {
	tb.Helper()
	seed, kills = 18, defaultKills
	if s := os.Getenv("CLUSTERSNAP_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 10, 64)
		require.NoError(tb, err, "CLUSTERSNAP_SEED")
		seed = v
	}
	if s := os.Getenv("CLUSTERSNAP_SOAK_KILLS"); s != "" {
		v, err := strconv.Atoi(s)
		require.NoError(tb, err, "CLUSTERSNAP_SOAK_KILLS")
		require.Positive(tb, v, "CLUSTERSNAP_SOAK_KILLS")
		kills = v
	}
	return seed, kills
}
