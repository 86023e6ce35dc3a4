package main

import (
	"bufio"
	"bytes"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// debugfsDLM is where the kernel shows each lockspace's resources.
const debugfsDLM = "/sys/kernel/debug/dlm"

// Lock states in debugfs (DLM_LKSTS_*).
const (
	statusWaiting = "1"
	statusConvert = "3"
)

// resourceQueues is what this kernel shows of a resource.
type resourceQueues struct {
	found      bool // the kernel has the resource in use
	master     bool // this node masters it: its queues are the whole truth
	converting int
	waiting    int
}

// readQueues reads resource's queues in lockspace from debugfs.
func readQueues(lockspace string, resource []byte) (resourceQueues, error) {
	b, err := os.ReadFile(filepath.Join(debugfsDLM, lockspace+"_all"))
	if err != nil {
		return resourceQueues{}, fmt.Errorf("queues of %s (is debugfs mounted?): %w", lockspace, err)
	}
	return parseQueues(b, resource)
}

// parseQueues finds resource in the kernel's "_all" debugfs format: an "rsb"
// line per resource ("rsb PTR NODEID FIRSTLKID FLAGS ROOT RECOVER COUNT LEN
// str NAME" or "... LEN hex XX XX ...", NODEID 0 on the master), then an
// "lkb" line per lock whose eighth field is its status.
func parseQueues(b, resource []byte) (resourceQueues, error) {
	var q resourceQueues
	sc := bufio.NewScanner(bytes.NewReader(b))
	in := false
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "rsb "):
			name, err := rsbName(line)
			if err != nil {
				return q, err
			}
			in = bytes.Equal(name, resource)
			if in {
				q.found = true
				q.master = strings.Fields(line)[2] == "0"
			}
		case in && strings.HasPrefix(line, "lkb "):
			f := strings.Fields(line)
			if len(f) < 9 {
				return q, fmt.Errorf("debugfs lkb line %q", line)
			}
			switch f[8] {
			case statusConvert:
				q.converting++
			case statusWaiting:
				q.waiting++
			}
		}
	}
	return q, sc.Err()
}

// rsbName decodes the name of an rsb line.
func rsbName(line string) ([]byte, error) {
	rest := line
	for range 9 {
		_, after, ok := strings.Cut(rest, " ")
		if !ok {
			return nil, fmt.Errorf("debugfs rsb line %q", line)
		}
		rest = after
	}
	if s, ok := strings.CutPrefix(rest, "str "); ok {
		return []byte(s), nil
	}
	if h, ok := strings.CutPrefix(rest, "hex"); ok {
		return hex.DecodeString(strings.ReplaceAll(h, " ", ""))
	}
	return nil, fmt.Errorf("debugfs rsb line %q", line)
}
