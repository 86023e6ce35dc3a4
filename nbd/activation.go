package nbd

import (
	"fmt"
	"net"
	"os"
	"strconv"
)

// listenFDsStart is the first file descriptor systemd passes (SD_LISTEN_FDS_START).
const listenFDsStart = 3

// ListenersFromEnv returns the listening sockets passed by systemd socket
// activation (or any launcher following its protocol, such as
// systemd-socket-activate or libnbd's interop harness): LISTEN_FDS
// descriptors from fd 3 on, when LISTEN_PID is this process. It returns nil
// and no error when no sockets were passed. LISTEN_PID, LISTEN_FDS and
// LISTEN_FDNAMES are unset either way, so that children do not inherit them.
// The descriptors are marked close-on-exec and handed over to the returned
// listeners, which the caller passes to Server.Serve.
func ListenersFromEnv() ([]net.Listener, error) {
	pidText, pidSet := os.LookupEnv("LISTEN_PID")
	fdsText, fdsSet := os.LookupEnv("LISTEN_FDS")
	os.Unsetenv("LISTEN_PID")
	os.Unsetenv("LISTEN_FDS")
	os.Unsetenv("LISTEN_FDNAMES")
	if !pidSet || !fdsSet {
		return nil, nil
	}
	pid, err := strconv.Atoi(pidText)
	if err != nil {
		return nil, fmt.Errorf("nbd: socket activation: LISTEN_PID %q: %w", pidText, err)
	}
	if pid != os.Getpid() {
		// Meant for another process (the variables leaked through a
		// parent that did not unset them).
		return nil, nil
	}
	n, err := strconv.Atoi(fdsText)
	if err != nil || n < 0 {
		return nil, fmt.Errorf("nbd: socket activation: LISTEN_FDS %q is not a count", fdsText)
	}
	if n == 0 {
		return nil, nil
	}
	listeners := make([]net.Listener, 0, n)
	for fd := listenFDsStart; fd < listenFDsStart+n; fd++ {
		closeOnExec(fd)
		f := os.NewFile(uintptr(fd), "LISTEN_FD_"+strconv.Itoa(fd))
		l, err := net.FileListener(f)
		// FileListener works on a duplicate; the original is ours to close.
		f.Close()
		if err != nil {
			for _, l := range listeners {
				l.Close()
			}
			return nil, fmt.Errorf("nbd: socket activation: fd %d: %w", fd, err)
		}
		listeners = append(listeners, l)
	}
	return listeners, nil
}
