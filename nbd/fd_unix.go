//go:build unix

package nbd

import (
	"fmt"
	"os"
	"syscall"
)

// closeOnExec keeps a descriptor passed by socket activation from leaking
// into child processes.
func closeOnExec(fd int) { syscall.CloseOnExec(fd) }

// nonblockingDup returns a non-blocking, close-on-exec duplicate of f, whose
// deadlines and Close interrupt blocked calls.
func nonblockingDup(f *os.File) (*os.File, error) {
	fd, err := syscall.Dup(int(f.Fd()))
	if err != nil {
		return nil, fmt.Errorf("nbd: stdio %s: dup: %w", f.Name(), err)
	}
	syscall.CloseOnExec(fd)
	if err := syscall.SetNonblock(fd, true); err != nil {
		syscall.Close(fd)
		return nil, fmt.Errorf("nbd: stdio %s: set non-blocking: %w", f.Name(), err)
	}
	return os.NewFile(uintptr(fd), f.Name()), nil
}
