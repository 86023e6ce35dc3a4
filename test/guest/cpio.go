package guest

import (
	"fmt"
	"io"
	"path"
	"strings"
)

// File-type bits of a cpio entry's mode (as in stat(2)).
const (
	modeDir     = 0o040000
	modeRegular = 0o100000
	modeSymlink = 0o120000
)

// cpioWriter writes a cpio archive in the "newc" format, the one the kernel
// unpacks into its initramfs. Parent directories are added on demand, since
// the kernel does not create them.
type cpioWriter struct {
	w     io.Writer
	n     int64           // bytes written so far, for the 4-byte padding
	inode uint32          // last inode number handed out
	dirs  map[string]bool // directories already in the archive
	err   error           // first write error; later writes are skipped
}

// newCPIOWriter returns a writer of an archive to w.
func newCPIOWriter(w io.Writer) *cpioWriter {
	return &cpioWriter{w: w, dirs: map[string]bool{"": true, ".": true, "/": true}}
}

// cleanName turns an absolute path into the relative name cpio stores.
func cleanName(name string) string {
	return strings.TrimPrefix(path.Clean("/"+name), "/")
}

// Dir adds a directory and its missing parents.
func (c *cpioWriter) Dir(name string, perm uint32) {
	name = cleanName(name)
	if c.dirs[name] {
		return
	}
	c.Dir(path.Dir(name), 0o755)
	c.dirs[name] = true
	c.entry(name, modeDir|perm, 2, nil)
}

// File adds a regular file (and its missing parent directories).
func (c *cpioWriter) File(name string, perm uint32, data []byte) {
	name = cleanName(name)
	c.Dir(path.Dir(name), 0o755)
	c.entry(name, modeRegular|perm, 1, data)
}

// Symlink adds a symbolic link name pointing at target.
func (c *cpioWriter) Symlink(name, target string) {
	name = cleanName(name)
	c.Dir(path.Dir(name), 0o755)
	c.entry(name, modeSymlink|0o777, 1, []byte(target))
}

// Close writes the trailer entry and returns the first error met.
func (c *cpioWriter) Close() error {
	c.entry("TRAILER!!!", 0, 1, nil)
	return c.err
}

// entry writes one header, name and body, each padded to 4 bytes.
func (c *cpioWriter) entry(name string, mode, nlink uint32, data []byte) {
	c.inode++
	header := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		c.inode, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(name)+1, 0)
	c.write([]byte(header))
	c.write([]byte(name + "\x00"))
	c.pad()
	c.write(data)
	c.pad()
}

func (c *cpioWriter) pad() {
	if rem := c.n % 4; rem != 0 {
		c.write(make([]byte, 4-rem))
	}
}

func (c *cpioWriter) write(p []byte) {
	if c.err != nil {
		return
	}
	n, err := c.w.Write(p)
	c.n += int64(n)
	if err != nil {
		c.err = fmt.Errorf("cpio archive: %w", err)
	}
}
