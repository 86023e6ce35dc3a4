package etcdcluster

import (
	"fmt"
	"os"
	"testing"

	"github.com/clustersnap/clustersnap/test/guest"
)

// snapdBinary is snapd, built once by TestMain for every test of the
// package, and not changed after.
var snapdBinary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "etcdcluster-snapd-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	snapdBinary, err = guest.GoBuild(dir, "github.com/clustersnap/clustersnap/cmd/snapd", false)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}
