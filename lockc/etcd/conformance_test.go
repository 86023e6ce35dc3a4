package etcd

import (
	"testing"
	"time"

	"github.com/clustersnap/clustersnap/lockc/locktest"
)

// testOptions are short leases, so that a crashed or cut-off node's locks
// go in seconds.
func testOptions() Options { return Options{TTL: 2 * time.Second, Margin: 500 * time.Millisecond} }

// The conformance suite passes on an embedded etcd server.
func TestConformanceEmbedded(t *testing.T) {
	locktest.Run(t, harness("etcd-embedded", embedded(1), testOptions()))
}
