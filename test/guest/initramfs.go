package guest

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// ErrMissingProgram is wrapped by errors about a host program (qemu, busybox,
// a requested binary) that is not installed.
var ErrMissingProgram = errors.New("program not installed")

// Config says what goes into an initramfs.
type Config struct {
	// Kernel is the kernel the initramfs is for; FindKernel's when zero.
	Kernel Kernel

	// Modules are the kernel modules /init loads, by name ("dm-snapshot",
	// "virtio_blk"); their dependencies are added. Virtio disks need
	// "virtio_pci" and "virtio_blk".
	Modules []string

	// Binaries are host programs copied to /bin, with the shared libraries
	// ldd lists at the same paths: a name found in PATH (or /usr/sbin,
	// /sbin), or an absolute path. Busybox is always included.
	Binaries []string

	// Files are extra files (mode 0755), by absolute path in the guest.
	Files map[string][]byte

	// HostPrograms are host programs the test itself runs (such as Netcat
	// for NetworkArgs, or fsck on the images afterwards); Setup requires
	// them like Binaries, but they are not copied into the guest.
	HostPrograms []string
}

// Initramfs is a built base initramfs: busybox, the modules, the binaries and
// an /init that loads the modules and runs the script that Run adds for each
// boot. It can be booted many times, also concurrently.
type Initramfs struct {
	Kernel  Kernel
	Path    string   // the gzip-compressed cpio archive
	Modules []string // module files in the order /init loads them
}

// Busybox is the program the initramfs is built around. It must be static,
// as Debian's busybox-static package installs it, or have its libraries
// found by ldd like any binary.
const Busybox = "busybox"

// modulesDir is where the modules sit in the guest; their names start with
// their load position, so a glob lists them in load order.
const modulesDir = "/lib/modules/guest"

// initScript is the guest's /init. It runs busybox's shell.
//
// The console log level is lowered so that kernel messages do not break into
// the script's output; the kernel log is printed after the end marker when
// the script failed. Disks appear once virtio_blk is loaded; /init waits a
// bounded time for as many as the boot has.
const initScript = `#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
dmesg -n 1
. /guest/env
failed=
for m in ` + modulesDir + `/*.ko; do
	[ -e "$m" ] || continue
	insmod "$m" || failed="$failed ${m##*/}"
done
i=0
while [ "$(ls /dev/vd? 2>/dev/null | wc -l)" -lt "$GUEST_DISKS" ] && [ $i -lt 100 ]; do
	sleep 0.1
	i=$((i + 1))
done
echo "@@guest-begin $GUEST_TOKEN@@"
if [ -n "$failed" ]; then
	echo "guest: insmod failed:$failed"
	status=125
elif [ "$(ls /dev/vd? 2>/dev/null | wc -l)" -lt "$GUEST_DISKS" ]; then
	echo "guest: only $(ls /dev/vd? 2>/dev/null | wc -l) of $GUEST_DISKS disks appeared"
	status=125
else
	cd /tmp
	sh /guest/script.sh </dev/null
	status=$?
fi
sync
echo "@@guest-end $GUEST_TOKEN status=$status@@"
if [ "$status" -ne 0 ]; then
	dmesg | tail -n 60
fi
poweroff -f
`

// Build makes an initramfs for cfg in dir.
func Build(ctx context.Context, dir string, cfg Config) (*Initramfs, error) {
	k := cfg.Kernel
	if k == (Kernel{}) {
		var err error
		if k, err = FindKernel(); err != nil {
			return nil, err
		}
	}
	modules, err := k.ModuleFiles(cfg.Modules...)
	if err != nil {
		return nil, err
	}
	out := filepath.Join(dir, "initramfs-"+k.Release+".cpio.gz")
	f, err := os.Create(out)
	if err != nil {
		return nil, fmt.Errorf("initramfs %s: %w", out, err)
	}
	defer f.Close()
	zw, err := gzip.NewWriterLevel(f, gzip.BestSpeed)
	if err != nil {
		return nil, fmt.Errorf("initramfs %s: %w", out, err)
	}
	cw := newCPIOWriter(zw)
	for _, d := range []string{"/proc", "/sys", "/dev", "/tmp", "/run", "/etc", "/root", "/var", "/mnt"} {
		cw.Dir(d, 0o755)
	}
	cw.File("/init", 0o755, []byte(initScript))
	cw.File("/etc/passwd", 0o644, []byte("root:x:0:0:root:/root:/bin/sh\n"))
	cw.File("/etc/group", 0o644, []byte("root:x:0:\n"))
	for i, m := range modules {
		data, err := readModule(ctx, m)
		if err != nil {
			return nil, err
		}
		cw.File(fmt.Sprintf("%s/%03d-%s.ko", modulesDir, i, moduleName(m)), 0o644, data)
	}
	libs := map[string]bool{}
	for _, name := range append([]string{Busybox}, cfg.Binaries...) {
		if err := addBinary(ctx, cw, name, libs); err != nil {
			return nil, err
		}
	}
	for name, data := range cfg.Files {
		cw.File(name, 0o755, data)
	}
	if err := cw.Close(); err != nil {
		return nil, fmt.Errorf("initramfs %s: %w", out, err)
	}
	if err := zw.Close(); err != nil {
		return nil, fmt.Errorf("initramfs %s: %w", out, err)
	}
	if err := f.Close(); err != nil {
		return nil, fmt.Errorf("initramfs %s: %w", out, err)
	}
	return &Initramfs{Kernel: k, Path: out, Modules: modules}, nil
}

// LookProgram finds a host program: an absolute path as it is, else in PATH,
// else in the sbin directories that a non-root PATH lacks.
func LookProgram(name string) (string, error) {
	if filepath.IsAbs(name) {
		if _, err := os.Stat(name); err != nil {
			return "", fmt.Errorf("program %s: %w: %w", name, ErrMissingProgram, err)
		}
		return name, nil
	}
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, dir := range []string{"/usr/sbin", "/sbin", "/usr/bin", "/bin"} {
		p := filepath.Join(dir, name)
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("program %s: %w", name, ErrMissingProgram)
}

// addBinary copies a host program to /bin and the shared libraries it loads
// to their own paths. libs records the libraries already added.
func addBinary(ctx context.Context, cw *cpioWriter, name string, libs map[string]bool) error {
	p, err := LookProgram(name)
	if err != nil {
		return err
	}
	data, err := os.ReadFile(p)
	if err != nil {
		return fmt.Errorf("program %s: %w", p, err)
	}
	cw.File("/bin/"+filepath.Base(p), 0o755, data)
	dynamic, err := isDynamic(p)
	if err != nil {
		return err
	}
	if !dynamic {
		return nil
	}
	needed, err := sharedLibraries(ctx, p)
	if err != nil {
		return err
	}
	for _, lib := range needed {
		if libs[lib] {
			continue
		}
		libs[lib] = true
		data, err := os.ReadFile(lib) // follows the symlink ldd names
		if err != nil {
			return fmt.Errorf("program %s: library %s: %w", p, lib, err)
		}
		cw.File(lib, 0o755, data)
	}
	return nil
}

// isDynamic tells whether an ELF program has a program interpreter, that is,
// needs the dynamic loader and shared libraries.
func isDynamic(path string) (bool, error) {
	f, err := elf.Open(path)
	if err != nil {
		return false, fmt.Errorf("program %s: %w", path, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return true, nil
		}
	}
	return false, nil
}

// sharedLibraries returns the files (the loader included) that ldd says a
// dynamically linked program loads.
func sharedLibraries(ctx context.Context, path string) ([]string, error) {
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, "ldd", path)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("program %s: ldd: %w: %s", path, err, strings.TrimSpace(stderr.String()))
	}
	libs, err := parseLDD(stdout.String())
	if err != nil {
		return nil, fmt.Errorf("program %s: %w", path, err)
	}
	return libs, nil
}

// parseLDD extracts library paths from ldd's output: "name => /path (addr)"
// lines and the loader's "/path (addr)" line; the vDSO has no file.
func parseLDD(out string) ([]string, error) {
	var libs []string
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" {
			continue
		}
		if name, target, ok := strings.Cut(line, "=>"); ok {
			fields := strings.Fields(target)
			if len(fields) == 0 || fields[0] == "not" {
				return nil, fmt.Errorf("ldd: library %s not found", strings.TrimSpace(name))
			}
			if filepath.IsAbs(fields[0]) {
				libs = append(libs, fields[0])
			}
			continue
		}
		if fields := strings.Fields(line); filepath.IsAbs(fields[0]) {
			libs = append(libs, fields[0])
		}
	}
	return libs, nil
}
