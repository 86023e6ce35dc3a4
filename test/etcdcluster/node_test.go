package etcdcluster

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"

	"github.com/clustersnap/clustersnap/volumes"
)

// servingLine starts the line snapd serve prints once its exports accept
// connections.
const servingLine = "serving:"

// node is one snapd serve process of the cluster: one incarnation at a
// time, each started by start and ended by kill or stop. Its output (both
// streams, every incarnation) is appended to a log file.
type node struct {
	id        int
	snapd     string   // the binary
	args      []string // serve's arguments
	sock, ctl string   // its NBD and control sockets
	log       *os.File

	cmd     *exec.Cmd
	serving chan struct{} // closed once this incarnation printed servingLine
	exited  chan struct{} // closed once it exited and its output is read
	waitErr error         // how it exited, set before exited is closed

	mu  sync.Mutex
	out []string // this incarnation's output lines
}

// start starts the node's next incarnation on the same paths as the last
// one: snapd serve takes over the sockets a killed incarnation left.
func (n *node) start() error {
	r, w, err := os.Pipe()
	if err != nil {
		return err
	}
	n.cmd = exec.Command(n.snapd, n.args...)
	n.cmd.Stdout, n.cmd.Stderr = w, w
	n.serving, n.exited = make(chan struct{}), make(chan struct{})
	n.mu.Lock()
	n.out = nil
	n.mu.Unlock()
	fmt.Fprintf(n.log, "==== node %d: snapd %s\n", n.id, strings.Join(n.args, " "))
	err = n.cmd.Start()
	w.Close()
	if err != nil {
		r.Close()
		return fmt.Errorf("node %d: %w", n.id, err)
	}
	drained := make(chan struct{})
	go func() {
		defer close(drained)
		defer r.Close()
		sc := bufio.NewScanner(r)
		served := false
		for sc.Scan() {
			line := sc.Text()
			fmt.Fprintln(n.log, line)
			n.mu.Lock()
			n.out = append(n.out, line)
			n.mu.Unlock()
			if !served && strings.HasPrefix(line, servingLine) {
				served = true
				close(n.serving)
			}
		}
	}()
	cmd, exited := n.cmd, n.exited
	go func() {
		err := cmd.Wait()
		<-drained
		n.waitErr = err
		close(exited)
	}()
	return nil
}

// waitServing waits until the current incarnation serves; it fails if the
// process exits first.
func (n *node) waitServing(ctx context.Context) error {
	select {
	case <-n.serving:
		return nil
	case <-n.exited:
		return fmt.Errorf("node %d exited before it served (%v):\n%s", n.id, n.waitErr, n.output())
	case <-ctx.Done():
		return fmt.Errorf("node %d does not serve: %w:\n%s", n.id, ctx.Err(), n.output())
	}
}

// kill kills the current incarnation with SIGKILL and waits for it.
func (n *node) kill() {
	_ = n.cmd.Process.Signal(syscall.SIGKILL)
	<-n.exited
}

// stop stops the current incarnation with SIGTERM (snapd completes and
// flushes the requests in flight) and returns how it exited.
func (n *node) stop(ctx context.Context) error {
	_ = n.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-n.exited:
		return n.waitErr
	case <-ctx.Done():
		n.kill()
		return fmt.Errorf("node %d did not stop on SIGTERM: %w", n.id, ctx.Err())
	}
}

// output is the current incarnation's output so far.
func (n *node) output() string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return strings.Join(n.out, "\n")
}

// tail is the last k lines of the current incarnation's output.
func (n *node) tail(k int) string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return strings.Join(n.out[max(0, len(n.out)-k):], "\n")
}

// status asks the running node for its status through its control socket,
// as snapd status --control --json does.
func (n *node) status(ctx context.Context) (volumes.Status, error) {
	var st volumes.Status
	cmd := exec.CommandContext(ctx, n.snapd, "status", "--control", n.ctl, "--json")
	cmd.Stderr = io.Discard
	out, err := cmd.Output()
	if err != nil {
		return st, fmt.Errorf("node %d: snapd status: %w", n.id, err)
	}
	if err := json.Unmarshal(out, &st); err != nil {
		return st, fmt.Errorf("node %d: snapd status: %w: %s", n.id, err, out)
	}
	return st, nil
}
