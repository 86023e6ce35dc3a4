package guest

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// ErrNoKernel is returned by FindKernel when no kernel image with a module
// tree is installed.
var ErrNoKernel = errors.New("no kernel with a module tree installed (apt-get install linux-image-amd64)")

// Kernel is an installed Linux kernel: its image and its module tree.
type Kernel struct {
	Release    string // the kernel release ("uname -r"), e.g. 6.1.0-56-amd64
	Image      string // the bootable image, /boot/vmlinuz-<release>
	ModulesDir string // the module tree, /lib/modules/<release>
}

// FindKernel returns the newest kernel installed in /boot that has a module
// tree in /lib/modules. It does not look at the running kernel: the host's
// kernel usually has no modules at all (see shared/specs/qemu-guests.md).
func FindKernel() (Kernel, error) {
	return findKernel("/boot", "/lib/modules")
}

// findKernel is FindKernel on other directories, for tests.
func findKernel(bootDir, modulesRoot string) (Kernel, error) {
	images, err := filepath.Glob(filepath.Join(bootDir, "vmlinuz-*"))
	if err != nil {
		return Kernel{}, fmt.Errorf("boot dir %s: %w", bootDir, err)
	}
	var found []Kernel
	for _, image := range images {
		release := strings.TrimPrefix(filepath.Base(image), "vmlinuz-")
		modules := filepath.Join(modulesRoot, release)
		if _, err := os.Stat(filepath.Join(modules, "modules.dep")); err != nil {
			continue
		}
		found = append(found, Kernel{Release: release, Image: image, ModulesDir: modules})
	}
	if len(found) == 0 {
		return Kernel{}, fmt.Errorf("boot dir %s, modules %s: %w", bootDir, modulesRoot, ErrNoKernel)
	}
	slices.SortFunc(found, func(a, b Kernel) int { return compareReleases(a.Release, b.Release) })
	return found[len(found)-1], nil
}

// compareReleases orders kernel releases by their numeric parts, so that
// 6.10.0 sorts after 6.9.0.
func compareReleases(a, b string) int {
	split := func(s string) []string {
		return strings.FieldsFunc(s, func(r rune) bool { return r == '.' || r == '-' || r == '+' || r == '~' })
	}
	pa, pb := split(a), split(b)
	for i := 0; i < len(pa) && i < len(pb); i++ {
		na, errA := strconv.Atoi(pa[i])
		nb, errB := strconv.Atoi(pb[i])
		switch {
		case errA == nil && errB == nil:
			if na != nb {
				return na - nb
			}
		default:
			if c := strings.Compare(pa[i], pb[i]); c != 0 {
				return c
			}
		}
	}
	return len(pa) - len(pb)
}

// moduleName is the canonical form of a module name: the kernel treats '-'
// and '_' alike.
func moduleName(s string) string {
	s = filepath.Base(s)
	for _, ext := range []string{".ko.xz", ".ko.zst", ".ko.gz", ".ko"} {
		if strings.HasSuffix(s, ext) {
			s = strings.TrimSuffix(s, ext)
			break
		}
	}
	return strings.ReplaceAll(s, "-", "_")
}

// moduleIndex is what modules.dep and modules.builtin say about a kernel.
type moduleIndex struct {
	files   map[string]string   // module name → path relative to the module tree
	deps    map[string][]string // module name → names it depends on
	builtin map[string]bool     // names of modules built into the image
}

// readModuleIndex parses dir's modules.dep (the file modprobe uses; its
// dependencies are what "modinfo -F depends" reports, closed transitively) and
// modules.builtin.
func readModuleIndex(dir string) (*moduleIndex, error) {
	idx := &moduleIndex{files: map[string]string{}, deps: map[string][]string{}, builtin: map[string]bool{}}
	depPath := filepath.Join(dir, "modules.dep")
	f, err := os.Open(depPath)
	if err != nil {
		return nil, fmt.Errorf("modules index %s: %w", depPath, err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		file, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		name := moduleName(file)
		idx.files[name] = file
		for _, dep := range strings.Fields(rest) {
			idx.deps[name] = append(idx.deps[name], moduleName(dep))
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("modules index %s: %w", depPath, err)
	}
	builtin, err := os.ReadFile(filepath.Join(dir, "modules.builtin"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("modules index %s: %w", dir, err)
	}
	for _, line := range strings.Fields(string(builtin)) {
		idx.builtin[moduleName(line)] = true
	}
	return idx, nil
}

// ModuleFiles returns the files of the named modules and of everything they
// depend on, in an order insmod can load them (dependencies first). Modules
// built into the kernel image are left out.
func (k Kernel) ModuleFiles(names ...string) ([]string, error) {
	idx, err := readModuleIndex(k.ModulesDir)
	if err != nil {
		return nil, err
	}
	var order []string
	state := map[string]int{} // 1 = being visited, 2 = done
	var visit func(name string, from []string) error
	visit = func(name string, from []string) error {
		switch state[name] {
		case 1:
			return fmt.Errorf("kernel %s: module %s: dependency cycle via %v", k.Release, name, from)
		case 2:
			return nil
		}
		file, ok := idx.files[name]
		if !ok {
			if idx.builtin[name] {
				state[name] = 2
				return nil
			}
			return fmt.Errorf("kernel %s: module %s (needed by %v): not in %s/modules.dep", k.Release, name, from, k.ModulesDir)
		}
		state[name] = 1
		for _, dep := range idx.deps[name] {
			if err := visit(dep, append(from, name)); err != nil {
				return err
			}
		}
		state[name] = 2
		order = append(order, filepath.Join(k.ModulesDir, file))
		return nil
	}
	for _, name := range names {
		if err := visit(moduleName(name), nil); err != nil {
			return nil, err
		}
	}
	return order, nil
}

// readModule returns the contents of a module file, decompressed: busybox
// insmod takes only plain .ko files. xz and zstd need the xz-utils and zstd
// packages, which only kernels with compressed modules call for.
func readModule(ctx context.Context, path string) ([]byte, error) {
	switch {
	case strings.HasSuffix(path, ".ko"):
		data, err := os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("module %s: %w", path, err)
		}
		return data, nil
	case strings.HasSuffix(path, ".ko.gz"):
		f, err := os.Open(path)
		if err != nil {
			return nil, fmt.Errorf("module %s: %w", path, err)
		}
		defer f.Close()
		zr, err := gzip.NewReader(f)
		if err != nil {
			return nil, fmt.Errorf("module %s: %w", path, err)
		}
		data, err := io.ReadAll(zr)
		if err != nil {
			return nil, fmt.Errorf("module %s: %w", path, err)
		}
		return data, nil
	case strings.HasSuffix(path, ".ko.xz"):
		return decompressWith(ctx, path, "xz", "-dc", path)
	case strings.HasSuffix(path, ".ko.zst"):
		return decompressWith(ctx, path, "zstd", "-dcq", path)
	default:
		return nil, fmt.Errorf("module %s: unknown file type", path)
	}
}

// decompressWith runs a decompressor that writes the plain module to stdout.
func decompressWith(ctx context.Context, path, tool string, args ...string) ([]byte, error) {
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, tool, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("module %s: %s: %w: %s", path, tool, err, strings.TrimSpace(stderr.String()))
	}
	return stdout.Bytes(), nil
}
