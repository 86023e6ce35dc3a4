//go:build linux

package blockdev

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// Create creates a sparse regular file of exactly size bytes at path and makes
// its existence durable. It refuses to touch an existing path.
func Create(path string, size int64) error {
	if size < 0 {
		return fmt.Errorf("blockdev %s: create: negative size %d", path, size)
	}
	osFile, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("blockdev %s: create: refusing to overwrite an existing file: %w", path, err)
	}
	if err != nil {
		return fmt.Errorf("blockdev: create: %w", err)
	}
	err = osFile.Truncate(size)
	if err == nil {
		err = osFile.Sync()
	}
	if closeErr := osFile.Close(); err == nil {
		err = closeErr
	}
	if err == nil {
		err = syncDir(filepath.Dir(path))
	}
	if err != nil {
		os.Remove(path)
		return fmt.Errorf("blockdev %s: create with size %d: %w", path, size, err)
	}
	return nil
}

// syncDir makes the entries of directory dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if closeErr := d.Close(); err == nil {
		err = closeErr
	}
	return err
}
