package dlm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/clustersnap/clustersnap/lockc"
)

// DefaultStallBound is how long a liveness probe may stay unanswered before
// the lockspace is declared lost, when Options.StallBound is zero. The
// kernel stops every member's lockspace while it recovers from a node
// failure; a bound shorter than a recovery (with fencing, seconds to tens
// of seconds) would make healthy nodes give up their locks on every
// failure elsewhere.
const DefaultStallBound = 30 * time.Second

// releaseBound is how long Close and Crash wait for the kernel to take the
// lockspace's locks away (closing the device, leaving the lockspace). A
// stopped lockspace can hold them up; the release then goes on in the
// background.
const releaseBound = 10 * time.Second

// Options configure an Engine.
type Options struct {
	// NodeID is the node's id in the cluster; 0 reads it from configfs
	// (the comms entry with local=1, as dlm_controld writes it).
	NodeID uint32
	// DevDir is where to find the DLM's device nodes, or to make them with
	// mknod if absent. "" searches /dev/misc and /dev for a node of the
	// minor that /proc/misc gives, and makes one in a private temporary
	// directory if there is none.
	DevDir string
	// StallBound is how long the liveness probe may stall before the
	// lockspace is lost (see the package comment); 0 is
	// DefaultStallBound. The probe runs every StallBound/3.
	StallBound time.Duration
}

// Engine joins kernel DLM lockspaces for one node. Every lockspace it opens
// has its own device file descriptor, which the kernel treats as one lock
// owner: several Engines (or several Opens) in one process hold locks
// independently, as separate processes would.
type Engine struct {
	o Options

	mu     sync.Mutex
	spaces map[*lockspace]struct{} // open, not yet released

	// abi, when set, replaces the version the kernel reports in
	// requests' behaviour (tests of the 6.0.1 work-around).
	abi *version
}

var _ lockc.Engine = (*Engine)(nil)

// New returns an Engine with options o.
func New(o Options) *Engine {
	if o.StallBound <= 0 {
		o.StallBound = DefaultStallBound
	}
	return &Engine{o: o, spaces: map[*lockspace]struct{}{}}
}

// Open joins lockspace name (creating it in the kernel if no process has):
// it blocks until the cluster controller has completed the join, or ctx
// ends. It fails with ErrNoController when no controller configured the
// local node, and ErrNoDLM when the kernel has no DLM.
func (e *Engine) Open(ctx context.Context, name string) (lockc.Lockspace, error) {
	nodeID := e.o.NodeID
	if nodeID == 0 {
		id, err := localNodeID()
		if err != nil {
			return nil, fmt.Errorf("open lockspace %s: %w", name, err)
		}
		nodeID = id
	}
	ctl, ver, err := e.openControl()
	if err != nil {
		return nil, fmt.Errorf("open lockspace %s: %w", name, err)
	}
	req, err := encodeLockspace(ver, cmdCreateLS, 0, 0, name)
	if err != nil {
		ctl.Close()
		return nil, fmt.Errorf("open lockspace: %w", err)
	}
	minor, err := e.create(ctx, ctl, ver, req, name)
	if err != nil {
		return nil, err
	}
	f, err := openDevice(e.o.DevDir, "dlm_"+name, minor)
	if err != nil {
		e.remove(ver, minor, name)
		return nil, fmt.Errorf("open lockspace %s: %w", name, err)
	}
	if e.abi != nil {
		ver = *e.abi
	}
	ls, err := newLockspace(e, name, nodeID, minor, ver, f)
	if err != nil {
		return nil, err
	}
	e.mu.Lock()
	e.spaces[ls] = struct{}{}
	e.mu.Unlock()
	return ls, nil
}

// create writes CREATE_LS on ctl and returns the lockspace's minor. The
// write blocks in the kernel until the controller completes the join; if
// ctx ends first, create returns ctx.Err() and leaves the lockspace again
// once the write returns.
func (e *Engine) create(ctx context.Context, ctl *os.File, ver version, req []byte, name string) (uint32, error) {
	type created struct {
		minor int
		err   error
	}
	done := make(chan created, 1)
	go func() {
		defer ctl.Close()
		n, err := writeFile(ctl, req)
		done <- created{n, err}
	}()
	var c created
	select {
	case c = <-done:
	case <-ctx.Done():
		go func() {
			if c := <-done; c.err == nil {
				e.remove(ver, uint32(c.minor), name)
			}
		}()
		return 0, fmt.Errorf("open lockspace %s: %w", name, ctx.Err())
	}
	switch {
	case errors.Is(c.err, unix.EUNATCH), errors.Is(c.err, unix.ENOTCONN):
		// EUNATCH: no local node; ENOTCONN: no local address to
		// listen on. Both are the controller's to configure.
		return 0, fmt.Errorf("open lockspace %s: %w", name, ErrNoController)
	case c.err != nil:
		return 0, fmt.Errorf("open lockspace %s: create: %w", name, c.err)
	}
	return uint32(c.minor), nil
}

// openControl opens the control device and reads its ABI version.
func (e *Engine) openControl() (*os.File, version, error) {
	minor, err := miscMinor(controlName)
	if err != nil {
		return nil, version{}, fmt.Errorf("%w: %w", ErrNoDLM, err)
	}
	f, err := openDevice(e.o.DevDir, controlName, minor)
	if err != nil {
		return nil, version{}, err
	}
	ver, err := readVersion(f)
	if err != nil {
		f.Close()
		return nil, version{}, err
	}
	return f, ver, nil
}

// remove leaves the lockspace of the given minor (REMOVE_LS); the kernel
// frees it when the last process that created it leaves. Every device file
// of this process for it must be closed, or the kernel waits for them.
func (e *Engine) remove(ver version, minor uint32, name string) error {
	ctl, _, err := e.openControl()
	if err != nil {
		return fmt.Errorf("leave lockspace %s: %w", name, err)
	}
	defer ctl.Close()
	req, err := encodeLockspace(ver, cmdRemoveLS, lsfForceFree, minor, "")
	if err != nil {
		return err
	}
	if _, err := writeFile(ctl, req); err != nil {
		return fmt.Errorf("leave lockspace %s: %w", name, err)
	}
	return nil
}

// forget drops ls from the open lockspaces.
func (e *Engine) forget(ls *lockspace) {
	e.mu.Lock()
	delete(e.spaces, ls)
	e.mu.Unlock()
}

// open returns the lockspaces this Engine has open, those named name
// if name is not empty.
func (e *Engine) open(name string) []*lockspace {
	e.mu.Lock()
	defer e.mu.Unlock()
	var out []*lockspace
	for ls := range e.spaces {
		if name == "" || ls.name == name {
			out = append(out, ls)
		}
	}
	return out
}

// Crash simulates the death of this node's process: every lockspace the
// Engine has open is lost (OnLost functions, then IsLost, then Lost, as for
// any loss) and its device file is closed without unlocking anything, so
// the kernel force-unlocks the locks as it does for a process that exits.
// It returns once the kernel has released them, or after a bound if a
// stopped lockspace holds the release up. Test tool.
func (e *Engine) Crash() {
	spaces := e.open("")
	for _, ls := range spaces {
		ls.lose(errCrashed)
	}
	for _, ls := range spaces {
		ls.awaitRelease()
	}
}

// Sync returns once every notification that the kernel had queued for
// this Engine's open lockspaces of that name before the call has been
// delivered to the locks (one request through each device file, whose
// answer comes after them), or ctx ends. Test tool for knowing that
// blocking notifications have arrived.
func (e *Engine) Sync(ctx context.Context, name string) error {
	for _, ls := range e.open(name) {
		if err := ls.barrier(ctx); err != nil && !errors.Is(err, lockc.ErrLost) {
			return err
		}
	}
	return nil
}

// readVersion reads the device ABI version from a DLM device file.
func readVersion(f *os.File) (version, error) {
	b := make([]byte, versionSize)
	raw, err := f.SyscallConn()
	if err != nil {
		return version{}, err
	}
	var n int
	var rerr error
	if err := raw.Read(func(fd uintptr) bool {
		n, rerr = unix.Read(int(fd), b)
		return true
	}); err != nil {
		return version{}, err
	}
	if rerr != nil {
		return version{}, fmt.Errorf("read DLM version from %s: %w", f.Name(), rerr)
	}
	return parseVersion(b[:n])
}

// writeFile writes one request to a DLM device and returns what the write
// returned: the kernel answers a request with a number (a lock id, a
// minor), not a byte count. The write can block in the kernel (a lockspace
// join, a stopped lockspace).
func writeFile(f *os.File, req []byte) (int, error) {
	raw, err := f.SyscallConn()
	if err != nil {
		return 0, err
	}
	var n int
	var werr error
	if err := raw.Write(func(fd uintptr) bool {
		for {
			n, werr = unix.Write(int(fd), req)
			if werr != unix.EINTR {
				return true
			}
		}
	}); err != nil {
		return 0, err
	}
	return n, werr
}
