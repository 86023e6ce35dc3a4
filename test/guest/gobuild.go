package guest

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// BuildStatic builds the Go command pkg (an import path) without cgo, so
// that it runs in the guest's initramfs, which has no C library, and
// returns the binary.
//
// go test keeps a passing result until a file the test process opened or
// looked at changes; the go tool reads the command's sources in a process
// of its own, so BuildStatic looks at each of them itself, and a change to
// the command's code (or the packages it uses) runs the test again.
func BuildStatic(t testing.TB, pkg string) []byte {
	t.Helper()
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("the go tool, to build %s for the guest: %v", pkg, err)
	}
	list := exec.Command(goTool, "list", "-deps", "-f",
		`{{if not .Standard}}{{range .GoFiles}}{{$.Dir}}/{{.}}{{"\n"}}{{end}}{{end}}`, pkg)
	list.Stderr = os.Stderr
	sources, err := list.Output()
	if err != nil {
		t.Fatalf("go list -deps %s: %v", pkg, err)
	}
	for _, src := range strings.Fields(string(sources)) {
		if _, err := os.Stat(src); err != nil {
			t.Fatalf("a source file of %s: %v", pkg, err)
		}
	}
	bin := filepath.Join(t.TempDir(), filepath.Base(pkg))
	cmd := exec.Command(goTool, "build", "-o", bin, pkg)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v: %s", pkg, err, out)
	}
	data, err := os.ReadFile(bin)
	if err != nil {
		t.Fatalf("%v", err)
	}
	return data
}
