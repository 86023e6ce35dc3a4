package persistent_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev/faultdev"
	"github.com/clustersnap/clustersnap/persistent"
)

func testLabel() exstore.Label {
	return exstore.Label{
		UUID:      exstore.UUID{0x10, 0x32, 0x54, 0x76, 0x98, 0xba, 0x4c, 0xde, 0x8f, 1, 2, 3, 4, 5, 6, 7},
		ClusterID: "c1",
		Origin:    exstore.OriginIdentity{Size: 1 << 30, ID: "serial=ABC"},
	}
}

func encodeLabel(t *testing.T, l exstore.Label) []byte {
	t.Helper()
	b := make([]byte, persistent.LabelSize)
	require.NoError(t, persistent.EncodeLabel(b, l))
	return b
}

// reseal recomputes the checksum of a record the test changed on purpose,
// so that the decoder's other checks are what refuse it.
func reseal(b []byte) {
	binary.LittleEndian.PutUint32(b[356:], crc32.Checksum(b[:356], crc32.MakeTable(crc32.Castagnoli)))
}

func TestLabelRoundTrip(t *testing.T) {
	for _, l := range []exstore.Label{
		testLabel(),
		{UUID: testLabel().UUID}, // only a UUID, as snapd create writes it
		{UUID: testLabel().UUID, ClusterID: strings.Repeat("c", persistent.MaxLabelClusterID),
			Origin: exstore.OriginIdentity{Size: 1<<63 - 1, ID: strings.Repeat("é", persistent.MaxLabelOriginID/2)}},
	} {
		b := encodeLabel(t, l)
		assert.Equal(t, []byte("CSLB\x01\x00\x00\x00"), b[:8], "magic, version and merge state")
		got, ok, err := persistent.DecodeLabel(b)
		require.NoError(t, err)
		require.True(t, ok)
		assert.Equal(t, l, got)
	}
	_, ok, err := persistent.DecodeLabel(make([]byte, persistent.LabelSize))
	require.NoError(t, err)
	assert.False(t, ok, "all zero is no label")

	// The merge states, in bytes 6..7 of the record (22..23 of the chunk).
	for state, want := range map[exstore.MergeState][]byte{exstore.Merging: {1, 0}, exstore.Merged: {2, 0}} {
		l := testLabel()
		l.Merge = state
		b := encodeLabel(t, l)
		assert.Equal(t, want, b[6:8], "%v", state)
		got, ok, err := persistent.DecodeLabel(b)
		require.NoError(t, err)
		require.True(t, ok)
		assert.Equal(t, l, got)
	}
}

func TestLabelRecordsRefusedWithTheReason(t *testing.T) {
	for _, tc := range []struct {
		name   string
		change func(b []byte)
		reason string
	}{
		{"damaged byte", func(b []byte) { b[40] ^= 1 }, "checksum"},
		{"damaged checksum", func(b []byte) { b[359] ^= 0x80 }, "checksum"},
		{"foreign bytes", func(b []byte) { copy(b, "LVM2 x[5A%r0N*>") }, "not a clustersnap label"},
		{"one stray byte", func(b []byte) { clear(b); b[200] = 1 }, "not a clustersnap label"},
		{"unknown version", func(b []byte) { b[4] = 2; reseal(b) }, "version 2 is not supported"},
		{"unknown merge state", func(b []byte) { b[6] = 3; reseal(b) }, "merge state 3 is unknown"},
		{"merge state high byte", func(b []byte) { b[7] = 1; reseal(b) }, "merge state 256 is unknown"},
		{"merging without an origin", func(b []byte) { b[6] = 1; clear(b[24:32]); clear(b[34:36]); clear(b[100:356]); reseal(b) }, "names no origin"},
		{"cluster id too long", func(b []byte) { b[32] = 65; reseal(b) }, "cluster id length 65"},
		{"origin id too long", func(b []byte) { binary.LittleEndian.PutUint16(b[34:], 300); reseal(b) }, "origin id length 300"},
		{"bytes after the cluster id", func(b []byte) { b[36+5] = 'x'; reseal(b) }, "not zero"},
		{"bytes after the origin id", func(b []byte) { b[355] = 'x'; reseal(b) }, "not zero"},
		{"zero UUID", func(b []byte) { clear(b[8:24]); reseal(b) }, "UUID is zero"},
		{"not UTF-8", func(b []byte) { b[36] = 0xff; reseal(b) }, "not UTF-8"},
		{"origin size over 63 bits", func(b []byte) { b[31] = 0x80; reseal(b) }, "63 bits"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := encodeLabel(t, testLabel())
			tc.change(b)
			_, ok, err := persistent.DecodeLabel(b)
			require.Error(t, err)
			assert.False(t, ok)
			assert.ErrorIs(t, err, persistent.ErrBadLabel)
			assert.Contains(t, err.Error(), tc.reason)
		})
	}
}

func TestEncodeLabelRefusesWhatTheRecordCannotHold(t *testing.T) {
	b := make([]byte, persistent.LabelSize)
	for _, tc := range []struct {
		name   string
		change func(l *exstore.Label)
	}{
		{"zero UUID", func(l *exstore.Label) { l.UUID = exstore.UUID{} }},
		{"long cluster id", func(l *exstore.Label) { l.ClusterID = strings.Repeat("c", persistent.MaxLabelClusterID+1) }},
		{"long origin id", func(l *exstore.Label) { l.Origin.ID = strings.Repeat("o", persistent.MaxLabelOriginID+1) }},
		{"negative size", func(l *exstore.Label) { l.Origin.Size = -1 }},
		{"not UTF-8", func(l *exstore.Label) { l.ClusterID = "\xff" }},
		{"unknown merge state", func(l *exstore.Label) { l.Merge = exstore.Merged + 1 }},
		{"merging without an origin", func(l *exstore.Label) { l.Merge, l.Origin = exstore.Merging, exstore.OriginIdentity{} }},
	} {
		l := testLabel()
		tc.change(&l)
		assert.ErrorIs(t, persistent.EncodeLabel(b, l), persistent.ErrBadLabel, tc.name)
	}
}

// labelledStore opens a store with 4 KiB chunks on a new device, with a
// few exceptions spread over two areas, and labels it.
func labelledStore(t *testing.T) (*persistent.Store, *faultdev.Device, []byte) {
	t.Helper()
	dev := faultdev.New("cow", 16*mib)
	s := open(t, dev, 8)
	for i := 0; i < 300; i++ {
		take(t, s, dev, exstore.Chunk(i*5), byte(i))
	}
	before := dev.Bytes()
	require.NoError(t, s.SetLabel(context.Background(), testLabel()))
	return s, dev, before
}

func TestSetLabelWritesOnlyTheLabelDurably(t *testing.T) {
	ctx := context.Background()
	s, dev, before := labelledStore(t)
	after := dev.DurableBytes()
	assert.Equal(t, before[:16], after[:16], "the kernel's header bytes")
	assert.Equal(t, encodeLabel(t, testLabel()), after[16:16+persistent.LabelSize], "the record, durable")
	assert.Equal(t, before[16+persistent.LabelSize:], after[16+persistent.LabelSize:], "everything after the record")

	l, ok, err := s.Label(ctx)
	require.NoError(t, err)
	require.True(t, ok)
	assert.Equal(t, testLabel(), l)

	// Relabelling replaces the record and nothing else.
	l.ClusterID, l.Origin.ID = "c2", ""
	require.NoError(t, s.SetLabel(ctx, l))
	got, ok, err := s.Label(ctx)
	require.NoError(t, err)
	require.True(t, ok)
	assert.Equal(t, l, got)
	assert.Equal(t, before[16+persistent.LabelSize:], dev.DurableBytes()[16+persistent.LabelSize:])
	assert.ErrorIs(t, s.SetLabel(ctx, exstore.Label{}), persistent.ErrBadLabel, "a label without a UUID")
}

func TestLabelSurvivesRefreshReloadAndInvalidation(t *testing.T) {
	ctx := context.Background()
	s, dev, _ := labelledStore(t)
	want := walk(s)
	require.NoError(t, s.Refresh(ctx))
	assert.Equal(t, want, walk(s))

	// A reload of the durable image: same exceptions, same label, and
	// Check is clean and shows the label.
	re := open(t, faultdev.FromBytes("cow", dev.DurableBytes()), 0)
	require.NoError(t, re.Err())
	assert.Equal(t, want, walk(re))
	l, ok, err := re.Label(ctx)
	require.NoError(t, err)
	require.True(t, ok)
	assert.Equal(t, testLabel(), l)
	r, err := persistent.Check(ctx, faultdev.FromBytes("cow", dev.DurableBytes()), nil)
	require.NoError(t, err)
	assert.True(t, r.OK(), "%v %s", r.Problems, r.LabelError)
	assert.Equal(t, uint64(300), r.Exceptions)
	require.NotNil(t, r.Label)
	assert.Equal(t, testLabel(), *r.Label)

	// Invalidation rewrites the header, as the kernel does, keeping the label.
	require.NoError(t, s.Invalidate(ctx, errors.New("test")))
	img := dev.DurableBytes()
	assert.Equal(t, hexBytes("53 6e 41 70 00 00 00 00 01 00 00 00 08 00 00 00"), img[:16])
	l, ok, err = persistent.ReadLabel(ctx, faultdev.FromBytes("cow", img))
	require.NoError(t, err)
	require.True(t, ok)
	assert.Equal(t, testLabel(), l)
}

func TestDamagedLabelIsReportedNotIgnored(t *testing.T) {
	ctx := context.Background()
	_, dev, _ := labelledStore(t)
	img := dev.DurableBytes()
	img[16+40] ^= 1 // a bit of the cluster id
	// The store still loads (the kernel would use the COW too) ...
	re := open(t, faultdev.FromBytes("cow", bytes.Clone(img)), 0)
	require.NoError(t, re.Err())
	// ... but the label is refused, by the store, ReadLabel and Check.
	_, _, err := re.Label(ctx)
	assert.ErrorIs(t, err, persistent.ErrBadLabel)
	_, _, err = persistent.ReadLabel(ctx, faultdev.FromBytes("cow", bytes.Clone(img)))
	assert.ErrorIs(t, err, persistent.ErrBadLabel)
	r, err := persistent.Check(ctx, faultdev.FromBytes("cow", img), nil)
	require.NoError(t, err)
	assert.Zero(t, r.Errors, "the metadata is fine")
	assert.Contains(t, r.LabelError, "checksum")
	assert.Nil(t, r.Label)
	assert.False(t, r.OK(), "a damaged label fails the check")
}

// FuzzLabel feeds arbitrary bytes to the record parser: it must refuse
// them with ErrBadLabel or return a label that encodes back to the very
// same bytes (the parser accepts only canonical records), and never panic.
func FuzzLabel(f *testing.F) {
	full := testLabel()
	f.Add(encodeLabelF(f, full))
	f.Add(encodeLabelF(f, exstore.Label{UUID: full.UUID}))
	f.Add(make([]byte, persistent.LabelSize))
	damaged := encodeLabelF(f, full)
	damaged[50] ^= 4
	f.Add(damaged)
	v2 := encodeLabelF(f, full)
	v2[4] = 2
	reseal(v2)
	f.Add(v2)
	f.Add([]byte("CSLB"))
	f.Fuzz(func(t *testing.T, data []byte) {
		l, ok, err := persistent.DecodeLabel(data)
		if len(data) < persistent.LabelSize {
			require.ErrorIs(t, err, persistent.ErrBadLabel)
			return
		}
		if err != nil {
			require.ErrorIs(t, err, persistent.ErrBadLabel)
			require.False(t, ok)
			return
		}
		if !ok {
			require.Equal(t, make([]byte, persistent.LabelSize), data[:persistent.LabelSize])
			return
		}
		b := make([]byte, persistent.LabelSize)
		require.NoError(t, persistent.EncodeLabel(b, l))
		require.Equal(t, data[:persistent.LabelSize], b)
	})
}

func encodeLabelF(f *testing.F, l exstore.Label) []byte {
	b := make([]byte, persistent.LabelSize)
	if err := persistent.EncodeLabel(b, l); err != nil {
		f.Fatal(err)
	}
	return b
}

func TestSetLabelWithOneSectorChunks(t *testing.T) {
	ctx := context.Background()
	dev := faultdev.New("cow", mib)
	s := open(t, dev, 1) // the header chunk is one sector: the label ends inside it
	take(t, s, dev, 7, 0xaa)
	before := dev.Bytes()
	require.NoError(t, s.SetLabel(ctx, testLabel()))
	after := dev.DurableBytes()
	assert.Equal(t, before[:16], after[:16])
	assert.Equal(t, before[16+persistent.LabelSize:], after[16+persistent.LabelSize:], "area 0 (chunk 1) and the data are untouched")
	re := open(t, faultdev.FromBytes("cow", after), 0)
	assert.Equal(t, walk(s), walk(re))
	l, ok, err := re.Label(ctx)
	require.NoError(t, err)
	require.True(t, ok)
	assert.Equal(t, testLabel(), l)
}
