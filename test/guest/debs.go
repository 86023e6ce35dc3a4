package guest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// ErrMissingDebs is wrapped by errors about Debian packages that are neither
// in the package directory nor downloadable.
var ErrMissingDebs = errors.New("debian packages not available")

// DebsEnv names the environment variable with a directory of downloaded
// .deb files (apt-get download) for the guests, for a machine that fetches
// them beforehand (an offline run); without it, FetchDebs downloads into the
// user's cache directory, as CI does.
const DebsEnv = "CLUSTERSNAP_GUEST_DEBS"

// DebsDir returns the directory FetchDebs uses: DebsEnv's, else
// clustersnap/debs in the user's cache directory.
func DebsDir() (string, error) {
	if dir := os.Getenv(DebsEnv); dir != "" {
		return dir, nil
	}
	cache, err := os.UserCacheDir()
	if err != nil {
		return "", fmt.Errorf("debs: %w", err)
	}
	return filepath.Join(cache, "clustersnap", "debs"), nil
}

// FetchDebs makes sure dir holds a .deb of every package, downloading the
// missing ones with apt-get download (which needs the host's package lists,
// not root). Packages are never installed on the host.
func FetchDebs(ctx context.Context, dir string, packages ...string) error {
	var missing []string
	for _, p := range packages {
		if _, err := debFile(dir, p); err != nil {
			missing = append(missing, p)
		}
	}
	if len(missing) == 0 {
		return nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("debs %s: %w", dir, err)
	}
	apt, err := exec.LookPath("apt-get")
	if err != nil {
		return fmt.Errorf("debs %s: %s: %w: %w", dir, strings.Join(missing, " "), ErrMissingDebs, err)
	}
	cmd := exec.CommandContext(ctx, apt, append([]string{"download"}, missing...)...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("debs %s: apt-get download %s: %w: %w: %s", dir, strings.Join(missing, " "), ErrMissingDebs, err, strings.TrimSpace(string(out)))
	}
	for _, p := range missing {
		if _, err := debFile(dir, p); err != nil {
			return err
		}
	}
	return nil
}

// debFile finds package p's .deb in dir (named p_VERSION_ARCH.deb as
// apt-get download names it).
func debFile(dir, p string) (string, error) {
	matches, err := filepath.Glob(filepath.Join(dir, p+"_*.deb"))
	if err != nil || len(matches) == 0 {
		return "", fmt.Errorf("debs %s: %s: %w", dir, p, ErrMissingDebs)
	}
	return matches[len(matches)-1], nil
}

// ExtractDebs unpacks the packages' .deb files from dir into root
// (dpkg-deb -x), without running any of their scripts.
func ExtractDebs(ctx context.Context, dir, root string, packages ...string) error {
	for _, p := range packages {
		deb, err := debFile(dir, p)
		if err != nil {
			return err
		}
		out, err := exec.CommandContext(ctx, "dpkg-deb", "-x", deb, root).CombinedOutput()
		if err != nil {
			return fmt.Errorf("debs: dpkg-deb -x %s: %w: %s", deb, err, strings.TrimSpace(string(out)))
		}
	}
	return nil
}

// RootFiles returns the files for Config.Files that run programs extracted
// under root: each program (a path inside root, such as
// /usr/sbin/corosync) at its own path, and the shared libraries ldd finds
// for it, with the extracted library directories searched first. Libraries
// from root go to their path inside root (under their soname, not as a
// symlink); libraries from the host go to their host path.
func RootFiles(ctx context.Context, root string, programs ...string) (map[string][]byte, error) {
	libDirs, err := extractedLibDirs(root)
	if err != nil {
		return nil, err
	}
	files := map[string][]byte{}
	for _, p := range programs {
		hostPath := filepath.Join(root, p)
		data, err := os.ReadFile(hostPath)
		if err != nil {
			return nil, fmt.Errorf("extracted program %s: %w", p, err)
		}
		files[p] = data
		libs, err := extractedLibraries(ctx, hostPath, libDirs)
		if err != nil {
			return nil, err
		}
		for _, lib := range libs {
			guestPath := lib
			if rel, err := filepath.Rel(root, lib); err == nil && !strings.HasPrefix(rel, "..") {
				guestPath = "/" + rel
			}
			if _, ok := files[guestPath]; ok {
				continue
			}
			data, err := os.ReadFile(lib)
			if err != nil {
				return nil, fmt.Errorf("extracted program %s: library %s: %w", p, lib, err)
			}
			files[guestPath] = data
		}
	}
	return files, nil
}

// extractedLibDirs lists the directories under root that hold shared
// libraries.
func extractedLibDirs(root string) ([]string, error) {
	seen := map[string]bool{}
	var dirs []string
	err := filepath.WalkDir(root, func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && strings.Contains(d.Name(), ".so") && !seen[filepath.Dir(path)] {
			seen[filepath.Dir(path)] = true
			dirs = append(dirs, filepath.Dir(path))
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("extracted root %s: %w", root, err)
	}
	return dirs, nil
}

// extractedLibraries is sharedLibraries with LD_LIBRARY_PATH set to the
// extracted library directories.
func extractedLibraries(ctx context.Context, path string, libDirs []string) ([]string, error) {
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, "ldd", path)
	cmd.Env = append(os.Environ(), "LD_LIBRARY_PATH="+strings.Join(libDirs, ":"))
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("program %s: ldd: %w: %s", path, err, strings.TrimSpace(stderr.String()))
	}
	libs, err := parseLDD(stdout.String())
	if err != nil {
		return nil, fmt.Errorf("program %s: %w (is its package in the list, or the library's package installed on the host?)", path, err)
	}
	return libs, nil
}
