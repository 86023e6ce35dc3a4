package dlm

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/test/guest"
)

// module is the module path the test binaries are built from.
const module = "github.com/clustersnap/clustersnap"

// guestSuite is a package whose test binary runs in the guest with
// CLUSTERSNAP_DLM_KERNEL=1 -test.v -test.run Run.
type guestSuite struct {
	Pkg string // package path below the module
	Run string // -test.run pattern
	// MustPass are the tests (sub-test paths) whose "--- PASS" lines must
	// be in the output, and MinPass how many "--- PASS" lines whose name
	// starts with PassPrefix there must at least be: a suite that skips
	// fails the host test.
	MustPass   []string
	PassPrefix string
	MinPass    int
}

// guestSuites run in the one guest, after TestNoController (which needs a
// kernel nothing has configured yet). Another package's DLM tests join the
// same guest run by adding an entry here, e.g.
//
//	{Pkg: "clusterized", Run: "KernelDLM", PassPrefix: "TestMultiNodeKernelDLM", MinPass: 19}
//
// with tests that call dlmtest.NewCluster (they skip outside the guest).
var guestSuites = []guestSuite{{
	Pkg: "lockc/dlm",
	Run: ".",
	MustPass: []string{
		"TestStallLoses", "TestCancelRaceLVB", "TestABI601", "TestClosePublishes", "TestPRToCWMovesNothing",
		"TestConformance/dlm/Crash", "TestConformance/dlm/CancelRace", "TestConformance/dlm/Linearizable",
	},
	PassPrefix: "TestConformance/dlm/",
	MinPass:    23, // every sub-test but Tokens, which the engine cannot offer
}, {
	Pkg: "clusterized",
	Run: "KernelDLM",
	MustPass: []string{
		"TestMultiNodeKernelDLM/kernel-dlm/MultiNode/crash", "TestMultiNodeKernelDLM/kernel-dlm/MultiNode/crash_2",
		"TestMultiNodeKernelDLMCatchesMutants",
	},
	PassPrefix: "TestMultiNodeKernelDLM",
	MinPass:    19, // the suite's 13 PASS lines and the mutant self-test's 6
}}

// benchSuites run their lockc benchmarks in the same guest, so that the
// kernel engine is measured beside the in-process one on the same
// (emulated) machine.
var benchSuites = []struct{ Name, Pkg string }{
	{"dlm", "lockc/dlm"},
	{"inproc", "lockc/inproc"},
}

// buildTest builds pkg's test binary without cgo, so that it runs in the
// guest's initramfs, which has no C library.
//
// go test keeps a passing result until a file the test process opened or
// looked at changes; the go tool reads the sources in a process of its
// own, so the test looks at each of them itself.
func buildTest(t *testing.T, pkg string) []byte {
	t.Helper()
	goTool, err := exec.LookPath("go")
	require.NoError(t, err, "the go tool, to build the guest's test binaries")
	path := module + "/" + pkg
	list := exec.Command(goTool, "list", "-deps", "-test", "-f",
		`{{if not (or .Standard (eq .Name "main"))}}{{range .GoFiles}}{{$.Dir}}/{{.}}{{"\n"}}{{end}}{{range .TestGoFiles}}{{$.Dir}}/{{.}}{{"\n"}}{{end}}{{range .XTestGoFiles}}{{$.Dir}}/{{.}}{{"\n"}}{{end}}{{end}}`, path)
	list.Stderr = os.Stderr
	sources, err := list.Output()
	require.NoError(t, err, "go list -deps -test %s", path)
	for _, src := range strings.Fields(string(sources)) {
		_, err := os.Stat(src)
		require.NoError(t, err, "a source file of %s", path)
	}
	bin := filepath.Join(t.TempDir(), "test")
	cmd := exec.Command(goTool, "test", "-c", "-o", bin, path)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "go test -c %s: %s", path, out)
	data, err := os.ReadFile(bin)
	require.NoError(t, err)
	return data
}

// binName is the guest path of pkg's test binary.
func binName(pkg string) string { return "/bin/" + strings.ReplaceAll(pkg, "/", "_") + ".test" }

// guestScript runs the suites and benchmarks, each between begin and end
// markers with its exit status.
func guestScript() string {
	var b strings.Builder
	b.WriteString(`mount -t configfs none /sys/kernel/config || exit 1
mount -t debugfs none /sys/kernel/debug || exit 1
ip link set lo up || exit 1
status=0
# run NAME BINARY ARGS...: the binary's output between markers, its status
# as a result line.
run() {
	name=$1; shift
	echo "@@begin $name@@"
	"$@" 2>&1
	s=$?
	echo "@@end $name@@"
	echo "result status-$name $s"
	[ $s -eq 0 ] || status=1
}
`)
	fmt.Fprintf(&b, "run nocontroller env CLUSTERSNAP_DLM_KERNEL=1 %s -test.v -test.run '^TestNoController$'\n", binName("lockc/dlm"))
	for _, s := range guestSuites {
		fmt.Fprintf(&b, "run %s env CLUSTERSNAP_DLM_KERNEL=1 %s -test.v -test.run '%s' -test.timeout 150s\n",
			strings.ReplaceAll(s.Pkg, "/", "_"), binName(s.Pkg), s.Run)
	}
	for _, s := range benchSuites {
		fmt.Fprintf(&b, "run bench-%s env CLUSTERSNAP_DLM_KERNEL=1 %s -test.run '^$' -test.bench 'CachedConvert|Uncached|PingPong' -test.benchtime 1s\n",
			s.Name, binName(s.Pkg))
	}
	// A clustered store's operations on both engines, alternated in one
	// benchmark so that both see the same (emulated, shared) machine.
	fmt.Fprintf(&b, "run bench-clusterized env CLUSTERSNAP_DLM_KERNEL=1 %s -test.run '^$' -test.bench 'BenchmarkEngineRatio/dlm' -test.benchtime 1s\n", binName("clusterized"))
	b.WriteString("exit $status\n")
	return b.String()
}

// section returns the output between the markers of name.
func section(output, name string) string {
	_, rest, ok := strings.Cut(output, "@@begin "+name+"@@\n")
	if !ok {
		return ""
	}
	body, _, _ := strings.Cut(rest, "@@end "+name+"@@")
	return body
}

// passed returns the names of the "--- PASS" lines of out.
func passed(out string) map[string]bool {
	names := map[string]bool{}
	for _, m := range regexp.MustCompile(`(?m)^\s*--- PASS: (\S+)`).FindAllStringSubmatch(out, -1) {
		names[m[1]] = true
	}
	return names
}

// benchLine matches a benchmark result: name, optional -GOMAXPROCS,
// iterations, ns/op.
var benchLine = regexp.MustCompile(`(?m)^(Benchmark\w+)(?:-\d+)?\s+(\d+)\s+([\d.]+) ns/op`)

// benchmarks returns ns/op by benchmark name from out.
func benchmarks(t *testing.T, out string) map[string]float64 {
	ns := map[string]float64{}
	for _, m := range benchLine.FindAllStringSubmatch(out, -1) {
		v, err := strconv.ParseFloat(m[3], 64)
		require.NoError(t, err)
		ns[m[1]] = v
		t.Logf("%s: %s iterations, %s ns/op", m[1], m[2], m[3])
	}
	return ns
}

// TestKernelDLMOneGuest boots one guest with the kernel DLM and runs the
// engine's tests, the lockc conformance suite on it, and the lock
// benchmarks of both engines there.
func TestKernelDLMOneGuest(t *testing.T) {
	files := map[string][]byte{}
	pkgs := []string{"lockc/dlm"}
	for _, s := range guestSuites {
		pkgs = append(pkgs, s.Pkg)
	}
	for _, s := range benchSuites {
		pkgs = append(pkgs, s.Pkg)
	}
	for _, pkg := range pkgs {
		if _, ok := files[binName(pkg)]; !ok {
			files[binName(pkg)] = buildTest(t, pkg)
		}
	}
	r := guest.Setup(t, guest.Config{Modules: []string{"configfs", "dlm"}, Files: files})
	ctx, cancel := context.WithTimeout(t.Context(), 4*time.Minute)
	defer cancel()
	res := guest.Boot(ctx, t, r, guest.Options{Script: guestScript(), MemoryMiB: 768})
	results := guest.Results(res.Output)

	nc := section(res.Output, "nocontroller")
	assert.Equal(t, "0", results["status-nocontroller"], "TestNoController:\n%s", nc)
	assert.True(t, passed(nc)["TestNoController"], "TestNoController must run (not skip) in a fresh guest:\n%s", nc)

	for _, s := range guestSuites {
		name := strings.ReplaceAll(s.Pkg, "/", "_")
		out := section(res.Output, name)
		assert.Equal(t, "0", results["status-"+name], "%s's tests in the guest", s.Pkg)
		pass := passed(out)
		for _, want := range s.MustPass {
			assert.True(t, pass[want], "%s: %s did not pass (skipped or missing)", s.Pkg, want)
		}
		n := 0
		for name := range pass {
			if strings.HasPrefix(name, s.PassPrefix) {
				n++
			}
		}
		assert.GreaterOrEqual(t, n, s.MinPass, "%s: passing tests named %s*", s.Pkg, s.PassPrefix)
		t.Logf("%s: %d tests passed, %d of them %s*", s.Pkg, len(pass), n, s.PassPrefix)
	}

	ns := map[string]map[string]float64{}
	for _, s := range benchSuites {
		assert.Equal(t, "0", results["status-bench-"+s.Name], "%s benchmarks", s.Name)
		ns[s.Name] = benchmarks(t, section(res.Output, "bench-"+s.Name))
	}
	for _, b := range []string{"BenchmarkCachedConvert", "BenchmarkUncachedNL", "BenchmarkUncachedEX", "BenchmarkPingPong"} {
		d, i := ns["dlm"][b], ns["inproc"][b]
		if assert.Positive(t, d, "%s on dlm", b) && assert.Positive(t, i, "%s on inproc", b) {
			t.Logf("%s: dlm %.0f ns/op, inproc %.0f ns/op: dlm/inproc %.1f", b, d, i, d/i)
		}
	}
}
