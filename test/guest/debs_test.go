package guest

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestRootFiles: an extracted program goes to its own path, a library found
// under the root goes to its path inside the root, and the host's to the
// host's path.
func TestRootFiles(t *testing.T) {
	host, err := LookProgram("true")
	require.NoError(t, err)
	libs, err := sharedLibraries(t.Context(), host)
	require.NoError(t, err)
	var libc string
	for _, l := range libs {
		if filepath.Base(l) == "libc.so.6" {
			libc = l
		}
	}
	if libc == "" {
		t.Skipf("%s does not load libc.so.6: %v", host, libs)
	}
	root := t.TempDir()
	copyFile := func(from, to string) {
		data, err := os.ReadFile(from)
		require.NoError(t, err)
		require.NoError(t, os.MkdirAll(filepath.Dir(to), 0o755))
		require.NoError(t, os.WriteFile(to, data, 0o755))
	}
	copyFile(host, filepath.Join(root, "usr/sbin/prog"))
	copyFile(libc, filepath.Join(root, "usr/lib/extracted/libc.so.6"))

	files, err := RootFiles(t.Context(), root, "/usr/sbin/prog")
	require.NoError(t, err)
	assert.Contains(t, files, "/usr/sbin/prog")
	assert.Contains(t, files, "/usr/lib/extracted/libc.so.6", "the extracted library, at its path in the root")
	assert.NotContains(t, files, libc, "the host's copy is not used")
	for name := range files {
		assert.False(t, strings.HasPrefix(name, root), "guest path %s is a host path under the root", name)
	}
}

// TestFetchDebsPresent: packages already in the directory are not
// downloaded, and a missing one that cannot be downloaded is reported.
func TestFetchDebsPresent(t *testing.T) {
	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, "corosync_3.1.7-1_amd64.deb"), nil, 0o644))
	require.NoError(t, FetchDebs(t.Context(), dir, "corosync"))
	deb, err := debFile(dir, "corosync")
	require.NoError(t, err)
	assert.Equal(t, filepath.Join(dir, "corosync_3.1.7-1_amd64.deb"), deb)
	_, err = debFile(dir, "dlm-controld")
	assert.ErrorIs(t, err, ErrMissingDebs)
}
