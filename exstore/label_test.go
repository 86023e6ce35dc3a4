package exstore_test

import (
	"encoding/json"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
)

func TestUUID(t *testing.T) {
	a, err := exstore.NewUUID()
	require.NoError(t, err)
	b, err := exstore.NewUUID()
	require.NoError(t, err)
	assert.NotEqual(t, a, b)
	assert.False(t, a.IsZero())
	assert.Equal(t, byte(0x40), a[6]&0xf0, "version 4")
	assert.Equal(t, byte(0x80), a[8]&0xc0, "RFC 9562 variant")

	u := exstore.UUID{0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0xfe, 0xdc, 0xba, 0x98, 0x76, 0x54, 0x32, 0x10}
	assert.Equal(t, "01234567-89ab-cdef-fedc-ba9876543210", u.String())
	p, err := exstore.ParseUUID(u.String())
	require.NoError(t, err)
	assert.Equal(t, u, p)
	for _, bad := range []string{"", "01234567-89ab-cdef-fedc-ba987654321", "0123456789abcdeffedcba9876543210xxxx", "0123456g-89ab-cdef-fedc-ba9876543210"} {
		_, err := exstore.ParseUUID(bad)
		assert.Error(t, err, bad)
	}

	l := exstore.Label{UUID: u, ClusterID: "c1", Origin: exstore.OriginIdentity{Size: 1 << 30, ID: "serial=ABC"}}
	j, err := json.Marshal(l)
	require.NoError(t, err)
	assert.JSONEq(t, `{"uuid":"01234567-89ab-cdef-fedc-ba9876543210","cluster_id":"c1","origin":{"size_bytes":1073741824,"id":"serial=ABC"}}`, string(j))
	var back exstore.Label
	require.NoError(t, json.Unmarshal(j, &back))
	assert.Equal(t, l, back)
	assert.Equal(t, "origin serial=ABC size 1.0 GiB (1073741824 bytes)", l.Origin.String())

	// The merge state is named, and left out while there is none.
	l.Merge = exstore.Merging
	j, err = json.Marshal(l)
	require.NoError(t, err)
	assert.Contains(t, string(j), `"merge":"merging"`)
	back = exstore.Label{}
	require.NoError(t, json.Unmarshal(j, &back))
	assert.Equal(t, l, back)
	require.Error(t, json.Unmarshal([]byte(`{"merge":"half"}`), &back))
	_, err = json.Marshal(exstore.Label{Merge: exstore.Merged + 1})
	require.Error(t, err)
}
