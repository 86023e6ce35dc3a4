package guest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// BuildStatic builds the Go command pkg (an import path) without cgo, so
// that it runs in the guest's initramfs, which has no C library, and
// returns the binary.
func BuildStatic(t testing.TB, pkg string) []byte {
	t.Helper()
	bin, err := GoBuild(t.TempDir(), pkg, true)
	if err != nil {
		t.Fatalf("%v", err)
	}
	data, err := os.ReadFile(bin)
	if err != nil {
		t.Fatalf("%v", err)
	}
	return data
}

// GoBuild builds the Go command pkg (an import path) into dir, without cgo
// if static, and returns the binary's path. It needs no testing.TB, so a
// TestMain can build a command once for all of a package's tests.
//
// go test keeps a passing result until a file the test process opened or
// looked at changes; the go tool reads the command's sources in a process
// of its own, so GoBuild looks at each of them itself, and a change to the
// command's code (or the packages it uses) runs the test again.
func GoBuild(dir, pkg string, static bool) (string, error) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		return "", fmt.Errorf("the go tool, to build %s: %w", pkg, err)
	}
	list := exec.Command(goTool, "list", "-deps", "-f",
		`{{if not .Standard}}{{range .GoFiles}}{{$.Dir}}/{{.}}{{"\n"}}{{end}}{{end}}`, pkg)
	list.Stderr = os.Stderr
	sources, err := list.Output()
	if err != nil {
		return "", fmt.Errorf("go list -deps %s: %w", pkg, err)
	}
	for _, src := range strings.Fields(string(sources)) {
		if _, err := os.Stat(src); err != nil {
			return "", fmt.Errorf("a source file of %s: %w", pkg, err)
		}
	}
	bin := filepath.Join(dir, filepath.Base(pkg))
	cmd := exec.Command(goTool, "build", "-o", bin, pkg)
	if static {
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build %s: %w: %s", pkg, err, out)
	}
	return bin, nil
}
