package etcd

import (
	"testing"

	"github.com/clustersnap/clustersnap/lockc"
	"github.com/clustersnap/clustersnap/lockc/etcd/etcdtest"
	"github.com/clustersnap/clustersnap/lockc/locktest"
)

// benchHarness is the engine as snapd runs it by default (Options' zero
// values: a 10 s lease) on one embedded etcd server on a unix socket, so
// that a benchmark times the engine and the server's round trips, not a
// network.
func benchHarness(b *testing.B) locktest.Harness {
	return harness("etcd-embedded", etcdtest.Start(b, 1).Endpoints(), Options{})
}

func BenchmarkCachedConvert(b *testing.B) { locktest.BenchmarkCachedConvert(b, benchHarness(b)) }

func BenchmarkUncachedNL(b *testing.B) { locktest.BenchmarkUncached(b, benchHarness(b), lockc.NL) }

func BenchmarkUncachedEX(b *testing.B) { locktest.BenchmarkUncached(b, benchHarness(b), lockc.EX) }

func BenchmarkPingPong(b *testing.B) { locktest.BenchmarkPingPong(b, benchHarness(b)) }
