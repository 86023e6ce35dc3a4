//go:build !unix

package nbd

import (
	"errors"
	"fmt"
	"os"
)

// closeOnExec does nothing: descriptors are not inherited by number here,
// and net.FileListener refuses them anyway.
func closeOnExec(int) {}

// nonblockingDup reports that pipes cannot be made interruptible here, so
// ServeStdio serves sockets only.
func nonblockingDup(f *os.File) (*os.File, error) {
	return nil, fmt.Errorf("nbd: stdio %s: %w", f.Name(), errors.ErrUnsupported)
}
