package etcd

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/clustersnap/clustersnap/lockc"
	"github.com/clustersnap/clustersnap/lockc/etcd/etcdtest"
)

// Loss tests: node A reaches etcd through a proxy, holds EX on a resource
// and writes a token-checking device while its OnLost has not run; node B
// reaches etcd directly and waits for EX. The proxy is cut (or slowed).
// What must hold, and is checked against what the device and etcd showed
// rather than argued from the code: A's OnLost runs and its writes stop
// while etcd still shows A's lock, hence before B can be granted; the
// device sees no write with a token lower than one it has already taken.

// fencingDevice is storage that checks fencing tokens, as a disk that
// keeps the highest token it has taken would: it refuses a write whose
// token is lower than that (a holder writing after a newer grant) and
// records it as a violation. It records every write and when it came.
type fencingDevice struct {
	mu       sync.Mutex
	highest  uint64
	writes   []deviceWrite
	refused  int
	violated chan struct{} // closed at the first refused write
}

// deviceWrite is one write as the device saw it.
type deviceWrite struct {
	node    string
	token   uint64
	at      time.Time
	refused bool
	highest uint64 // the device's highest token when the write came
}

func newFencingDevice() *fencingDevice {
	return &fencingDevice{violated: make(chan struct{})}
}

// errStaleToken is a write refused for its token.
var errStaleToken = errors.New("stale fencing token")

// Write writes on behalf of node with its lock's token.
func (d *fencingDevice) Write(node string, token uint64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	w := deviceWrite{node: node, token: token, at: time.Now(), highest: d.highest}
	if token < d.highest {
		w.refused = true
		if d.refused++; d.refused == 1 {
			close(d.violated)
		}
		d.writes = append(d.writes, w)
		return fmt.Errorf("node %s: token %d, device has seen %d: %w", node, token, d.highest, errStaleToken)
	}
	d.highest = token
	d.writes = append(d.writes, w)
	return nil
}

// log returns a copy of every write so far.
func (d *fencingDevice) log() []deviceWrite {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]deviceWrite(nil), d.writes...)
}

// The device takes equal and higher tokens and refuses lower ones.
func TestFenceDeviceRefusesStaleToken(t *testing.T) {
	d := newFencingDevice()
	for _, w := range []struct {
		node   string
		token  uint64
		refuse bool
	}{{"A", 5, false}, {"A", 5, false}, {"B", 7, false}, {"A", 5, true}, {"B", 7, false}, {"C", 6, true}, {"C", 8, false}} {
		err := d.Write(w.node, w.token)
		if got := errors.Is(err, errStaleToken); got != w.refuse {
			t.Fatalf("write by %s with token %d: %v; want refused %v", w.node, w.token, err, w.refuse)
		}
	}
	select {
	case <-d.violated:
	default:
		t.Fatal("violated not closed after a refused write")
	}
	var refused []string
	for _, w := range d.log() {
		if w.refused {
			refused = append(refused, fmt.Sprintf("%s:%d<%d", w.node, w.token, w.highest))
		}
	}
	if fmt.Sprint(refused) != "[A:5<7 C:6<7]" {
		t.Fatalf("refused writes %v", refused)
	}
}

// lossBound bounds a whole loss scenario; writerPace is how often node A
// writes.
const (
	lossBound  = 60 * time.Second
	writerPace = time.Millisecond
	entryPoll  = 5 * time.Millisecond
)

// failure is how node A's connection to etcd fails.
type failure int

const (
	cutConnection  failure = iota // the proxy stops forwarding
	slowConnection                // the proxy delays every byte by a second
)

// entrySeen is what reads of A's lock entry, straight from etcd, showed.
// B's grant needs the entry gone, so it committed after lastPresent.
type entrySeen struct {
	lastPresent time.Time // start of the last read that found it
	presentRev  int64     // that read's revision
	goneAt      time.Time // end of the first read that did not
	err         error
}

// watchEntry reads key every entryPoll until it is gone or ctx ends.
func watchEntry(ctx context.Context, c *clientv3.Client, key string) <-chan entrySeen {
	ch := make(chan entrySeen, 1)
	go func() {
		var s entrySeen
		defer func() { ch <- s }()
		tick := time.NewTicker(entryPoll)
		defer tick.Stop()
		for {
			start := time.Now()
			r, err := c.Get(ctx, key, clientv3.WithCountOnly())
			if err != nil {
				s.err = fmt.Errorf("read %s: %w", key, err)
				return
			}
			if r.Count == 0 {
				s.goneAt = time.Now()
				return
			}
			s.lastPresent, s.presentRev = start, r.Header.Revision
			select {
			case <-tick.C:
			case <-ctx.Done():
				s.err = fmt.Errorf("entry %s still there: %w", key, ctx.Err())
				return
			}
		}
	}()
	return ch
}

// lossOptions are a short lease, so that a cut-off node fences itself and
// etcd expires its lease in about two seconds.
func lossOptions() Options { return Options{TTL: 2 * time.Second, Margin: 500 * time.Millisecond} }

// lossRun is one loss scenario and what it saw.
type lossRun struct {
	dev     *fencingDevice
	proxy   *etcdtest.Proxy
	cluster *testCluster
	engineA *Engine
	name    string
	res     []byte

	lsA, lsB lockc.Lockspace
	lockA    lockc.Lock
	lockB    lockc.Lock

	failAt     time.Time // when the proxy was cut or slowed
	lostAt     time.Time // when A's OnLost ran; zero if it did not
	bGrantedAt time.Time // when B's Lock returned
	tokenA     uint64
	tokenB     uint64
	entry      entrySeen
}

// runLoss runs the scenario: A (through a proxy, with the engine's
// self-fencing switched off if unfenced) holds EX and writes the device
// until its OnLost runs; B waits for EX; A's connection fails. It returns
// once B is granted and has written, and A's writer has stopped (on its
// own, or once the device refused it, or after a bound). The proxy is
// healed at the test's cleanup, before the engines close.
func runLoss(t *testing.T, f failure, unfenced bool) *lossRun {
	ctx, cancel := context.WithTimeout(context.Background(), lossBound)
	t.Cleanup(cancel)
	etcd := etcdtest.Start(t, 1)
	run := &lossRun{dev: newFencingDevice(), name: "loss", res: []byte("volume")}
	run.proxy = etcdtest.NewProxy(t, etcd.Endpoint(0))
	run.cluster = newTestCluster(t, etcd.Endpoints(), lossOptions())
	oA := run.cluster.o
	oA.Endpoints = []string{run.proxy.Endpoint()}
	eA, err := New(oA)
	if err != nil {
		t.Fatal(err)
	}
	eA.noSelfFence = unfenced
	run.engineA = eA
	t.Cleanup(func() { eA.Close() })
	t.Cleanup(func() {
		run.proxy.SetDelay(0)
		run.proxy.Heal()
	})

	run.lsA, err = eA.Open(ctx, run.name)
	if err != nil {
		t.Fatal(err)
	}
	run.lsB, err = run.cluster.Node(2).Open(ctx, run.name)
	if err != nil {
		t.Fatal(err)
	}
	var lostAt atomic.Pointer[time.Time] // set by A's OnLost: A's I/O flag
	run.lsA.(lockc.LostNotifier).OnLost(func() {
		now := time.Now()
		lostAt.Store(&now)
	})
	run.lockA, err = run.lsA.Lock(ctx, run.res, lockc.EX)
	if err != nil {
		t.Fatal(err)
	}
	run.tokenA = run.lockA.(lockc.Tokener).Token()
	if err := run.dev.Write("A", run.tokenA); err != nil {
		t.Fatal(err)
	}
	stopA, doneA := make(chan struct{}), make(chan struct{})
	go func() { // A's I/O, checked against the flag as volumes does
		defer close(doneA)
		tick := time.NewTicker(writerPace)
		defer tick.Stop()
		for lostAt.Load() == nil {
			run.dev.Write("A", run.tokenA)
			select {
			case <-tick.C:
			case <-stopA:
				return
			}
		}
	}()

	type grant struct {
		l   lockc.Lock
		at  time.Time
		err error
	}
	granted := make(chan grant, 1)
	go func() {
		l, err := run.lsB.Lock(ctx, run.res, lockc.EX)
		g := grant{l: l, at: time.Now(), err: err}
		if err == nil {
			g.err = run.dev.Write("B", l.(lockc.Tokener).Token())
		}
		granted <- g
	}()
	if err := run.cluster.WaitQueueLen(ctx, run.name, run.res, 0, 1); err != nil {
		t.Fatal(err)
	}
	seen := watchEntry(ctx, run.cluster.admin, run.lockA.(*lock).key)

	run.failAt = time.Now()
	switch f {
	case cutConnection:
		run.proxy.Cut()
	case slowConnection:
		run.proxy.SetDelay(time.Second)
	}

	var g grant
	select {
	case g = <-granted:
	case <-ctx.Done():
		t.Fatalf("B not granted EX within %v of the start", lossBound)
	}
	if g.err != nil {
		t.Fatalf("B: %v", g.err)
	}
	run.lockB, run.bGrantedAt = g.l, g.at
	run.tokenB = g.l.(lockc.Tokener).Token()
	// A has stopped already if it fenced itself; if not, its next write
	// comes after B's and the device refuses it.
	bound := time.NewTimer(5 * time.Second)
	select {
	case <-doneA:
	case <-run.dev.violated:
	case <-bound.C:
	}
	bound.Stop()
	close(stopA)
	<-doneA
	run.entry = <-seen
	if p := lostAt.Load(); p != nil {
		run.lostAt = *p
	}
	return run
}

// since formats t as a delay after the connection failed.
func (r *lossRun) since(t time.Time) string {
	if t.IsZero() {
		return "never"
	}
	return "+" + t.Sub(r.failAt).Round(time.Millisecond).String()
}

// problems checks the run: everything that shows A writing, or able to
// write, once B could be granted.
func (r *lossRun) problems() []string {
	var p []string
	var lastA time.Time
	afterLost := 0
	for _, w := range r.dev.log() {
		if w.refused {
			p = append(p, fmt.Sprintf("device refused node %s's write at %s: token %d after it had taken %d", w.node, r.since(w.at), w.token, w.highest))
		}
		if w.node == "A" {
			lastA = w.at
			if !r.lostAt.IsZero() && w.at.After(r.lostAt) {
				afterLost++
			}
		}
	}
	switch {
	case r.entry.err != nil:
		p = append(p, fmt.Sprintf("A's lock entry: %v", r.entry.err))
	case r.entry.lastPresent.IsZero():
		p = append(p, "A's lock entry was never seen in etcd")
	}
	if r.tokenB <= r.tokenA {
		p = append(p, fmt.Sprintf("B's token %d is not above A's %d", r.tokenB, r.tokenA))
	}
	if int64(r.tokenB) <= r.entry.presentRev {
		p = append(p, fmt.Sprintf("B granted at revision %d, yet A's entry was there at revision %d", r.tokenB, r.entry.presentRev))
	}
	if r.lostAt.IsZero() {
		p = append(p, "A's OnLost never ran")
	} else {
		if !r.lostAt.Before(r.entry.lastPresent) {
			p = append(p, fmt.Sprintf("A's OnLost ran at %s, not before etcd last showed A's lock (%s), so B could be granted first", r.since(r.lostAt), r.since(r.entry.lastPresent)))
		}
		if !r.lostAt.Before(r.bGrantedAt) {
			p = append(p, fmt.Sprintf("A's OnLost ran at %s, after B was granted (%s)", r.since(r.lostAt), r.since(r.bGrantedAt)))
		}
	}
	// The write that had passed the flag check when OnLost ran may land
	// after it; no other.
	if afterLost > 1 {
		p = append(p, fmt.Sprintf("A wrote %d times after its OnLost ran", afterLost))
	}
	if !lastA.Before(r.entry.lastPresent) {
		p = append(p, fmt.Sprintf("A's last write at %s, not before etcd last showed A's lock (%s), so after B could be granted", r.since(lastA), r.since(r.entry.lastPresent)))
	}
	return p
}

// logTimes reports when things happened after the connection failed.
func (r *lossRun) logTimes(t *testing.T) {
	var lastA time.Time
	for _, w := range r.dev.log() {
		if w.node == "A" {
			lastA = w.at
		}
	}
	t.Logf("after the failure: A fenced %s, A's last write %s, A's entry last seen %s and gone %s, B granted %s (tokens A %d, B %d)",
		r.since(r.lostAt), r.since(lastA), r.since(r.entry.lastPresent), r.since(r.entry.goneAt), r.since(r.bGrantedAt), r.tokenA, r.tokenB)
}

// checkFenced asserts a run that must have fenced A in time.
func checkFenced(t *testing.T, r *lossRun) {
	t.Helper()
	r.logTimes(t)
	for _, p := range r.problems() {
		t.Error(p)
	}
	if err := r.lsA.Err(); !errors.Is(err, lockc.ErrLost) {
		t.Errorf("A's lockspace: Err %v, want it to wrap lockc.ErrLost", err)
	}
	select {
	case <-r.lsA.Lost():
	default:
		t.Error("A's lockspace: Lost not closed")
	}
}

// A node cut off from etcd fences itself, and stops writing, before the
// node waiting for its lock is granted.
func TestLossCutFencesBeforeOtherGrant(t *testing.T) {
	checkFenced(t, runLoss(t, cutConnection, false))
}

// The same under injected delay: A's keep-alives still reach etcd, a
// second late each way, and keep its lease alive there for a while; A
// fences itself once no answer comes back in time (specs/locks.md test 18).
func TestLossDelayFencesBeforeOtherGrant(t *testing.T) {
	checkFenced(t, runLoss(t, slowConnection, false))
}

// The checks catch a node that does not fence itself: with the engine's
// self-fencing switched off, the cut-off A keeps writing after B's grant,
// with its older token, and the device refuses it.
func TestFenceCheckCatchesUnfencedNode(t *testing.T) {
	r := runLoss(t, cutConnection, true)
	r.logTimes(t)
	var caught bool
	for _, w := range r.dev.log() {
		if w.refused && w.node == "A" && w.token == r.tokenA && w.highest == r.tokenB && w.at.After(r.bGrantedAt) {
			caught = true
		}
	}
	if !caught {
		t.Errorf("the device refused no write of A's after B's grant (tokens A %d, B %d)", r.tokenA, r.tokenB)
	}
	p := r.problems()
	if len(p) == 0 {
		t.Error("the checks found nothing wrong with an unfenced node")
	}
	for _, s := range p {
		t.Logf("caught: %s", s)
	}
}

// Once the cut heals, the lost lockspace stays lost, and the node can
// join again with a new membership that gets the lock after B.
func TestLossCutStaysLostAfterHeal(t *testing.T) {
	r := runLoss(t, cutConnection, false)
	checkFenced(t, r)
	ctx, cancel := context.WithTimeout(context.Background(), lossBound)
	defer cancel()
	r.proxy.Heal()
	// A round trip through the healed proxy: A's client reaches etcd.
	if _, err := r.engineA.client.Get(ctx, r.cluster.o.Prefix); err != nil {
		t.Fatalf("through the healed proxy: %v", err)
	}
	if err := r.lsA.Err(); !errors.Is(err, lockc.ErrLost) {
		t.Errorf("A's lockspace after the heal: Err %v, want lockc.ErrLost", err)
	}
	if !r.lsA.(lockc.LostChecker).IsLost() {
		t.Error("A's lockspace after the heal: IsLost false")
	}
	if _, err := r.lsA.Lock(ctx, []byte("other"), lockc.NL); !errors.Is(err, lockc.ErrLost) {
		t.Errorf("A's lockspace after the heal: Lock: %v, want lockc.ErrLost", err)
	}
	if err := r.lockA.Convert(ctx, lockc.PR); !errors.Is(err, lockc.ErrUnlocked) {
		t.Errorf("A's lost lock after the heal: Convert: %v, want lockc.ErrUnlocked", err)
	}

	ls, err := r.engineA.Open(ctx, r.name)
	if err != nil {
		t.Fatalf("A joins again: %v", err)
	}
	if ls.NodeID() == r.lsA.NodeID() {
		t.Errorf("A's new membership has the lost one's node id %d", ls.NodeID())
	}
	if err := r.lockB.Unlock(ctx); err != nil {
		t.Fatal(err)
	}
	l, err := ls.Lock(ctx, r.res, lockc.EX)
	if err != nil {
		t.Fatalf("A's new membership: %v", err)
	}
	if tok := l.(lockc.Tokener).Token(); tok <= r.tokenB {
		t.Errorf("A's new grant has token %d, not above B's %d", tok, r.tokenB)
	}
	if err := r.dev.Write("A", l.(lockc.Tokener).Token()); err != nil {
		t.Errorf("A's new membership writes: %v", err)
	}
	if err := ls.Close(); err != nil {
		t.Error(err)
	}
}
