package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"strings"

	"github.com/dustin/go-humanize"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/persistent"
)

// statusReport is what snapd status prints, and its --json form.
type statusReport struct {
	COW              string  `json:"cow"`
	State            string  `json:"state"` // valid, invalid
	Reason           string  `json:"reason,omitempty"`
	ChunkSize        uint64  `json:"chunk_size_bytes"`
	Exceptions       uint64  `json:"exceptions"`
	Capacity         uint64  `json:"capacity_exceptions"`
	AllocatedSectors uint64  `json:"allocated_sectors"`
	TotalSectors     uint64  `json:"total_sectors"`
	MetadataSectors  uint64  `json:"metadata_sectors"`
	FillPercent      float64 `json:"fill_percent"`
	Status           string  `json:"dmsetup_status"`
	Warning          string  `json:"warning,omitempty"`
	// Label is the COW's label, nil if it has none or LabelError says
	// why it cannot be used.
	Label      *exstore.Label `json:"label,omitempty"`
	LabelError string         `json:"label_error,omitempty"`
}

func runStatus(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	flags := newFlags("status", "[--json] [--warn PERCENT] COW... | --control PATH [--json]", stderr)
	asJSON := flags.Bool("json", false, "print JSON, one object per COW in an array (with --control: the server's status object)")
	warn := flags.Float64("warn", 80, "warn when the COW is fuller than this percentage")
	controlPath := flags.String("control", "", "ask the snapd serve running with this --control socket instead of reading COWs")
	if err := parse(flags, args); err != nil {
		return err
	}
	if *controlPath != "" {
		if flags.NArg() > 0 {
			return usagef("--control reports the running server: name no COW")
		}
		st, err := liveStatus(ctx, *controlPath)
		if err != nil {
			return err
		}
		if *asJSON {
			enc := json.NewEncoder(stdout)
			enc.SetIndent("", "  ")
			return enc.Encode(st)
		}
		printLiveStatus(stdout, st)
		return nil
	}
	if flags.NArg() == 0 {
		return usagef("name at least one COW")
	}
	var reports []statusReport
	var failed []string
	for _, path := range flags.Args() {
		r, err := snapshotStatus(ctx, path, *warn)
		if err != nil && flags.NArg() == 1 {
			return err
		}
		if err != nil {
			fmt.Fprintf(stderr, "snapd status: %v\n", err)
			failed = append(failed, path)
			continue
		}
		reports = append(reports, r)
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(reports); err != nil {
			return err
		}
	} else {
		for _, r := range reports {
			printStatus(stdout, r)
		}
	}
	if len(failed) > 0 {
		return fmt.Errorf("%d of %d COWs could not be read: %s", len(failed), flags.NArg(), strings.Join(failed, ", "))
	}
	return nil
}

func snapshotStatus(ctx context.Context, path string, warn float64) (statusReport, error) {
	dev, err := blockdev.Open(path, blockdev.Options{ReadOnly: true})
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return statusReport{}, fmt.Errorf("cow %s: no such file or device", path)
		}
		return statusReport{}, err
	}
	defer dev.Close()
	s, err := persistent.Open(ctx, dev, persistent.Options{NoFormat: true})
	if err != nil {
		return statusReport{}, err
	}
	defer s.Close()
	u := s.Usage()
	r := statusReport{
		COW:              path,
		State:            "valid",
		ChunkSize:        uint64(s.ChunkSectors()) * exstore.SectorSize,
		Exceptions:       u.Exceptions,
		Capacity:         s.Geometry().Capacity(),
		AllocatedSectors: u.AllocatedSectors,
		TotalSectors:     u.TotalSectors,
		MetadataSectors:  u.MetadataSectors,
		Status:           u.String(),
	}
	if l, ok, err := s.Label(ctx); err != nil {
		r.LabelError = err.Error()
	} else if ok {
		r.Label = &l
	}
	if u.TotalSectors > 0 {
		r.FillPercent = 100 * float64(u.AllocatedSectors) / float64(u.TotalSectors)
	}
	if err := s.Err(); err != nil {
		r.State, r.Reason, r.Status = "invalid", err.Error(), "Invalid"
	} else if r.FillPercent >= warn {
		r.Warning = fmt.Sprintf("COW is %.1f%% full: when it fills, the snapshot is invalidated", r.FillPercent)
	}
	return r, nil
}

func printStatus(w io.Writer, r statusReport) {
	sec := func(n uint64) string { return humanize.IBytes(n * exstore.SectorSize) }
	fmt.Fprintf(w, "%s: %s\n", r.COW, r.State)
	if r.Reason != "" {
		fmt.Fprintf(w, "  reason:     %s\n", r.Reason)
	}
	fmt.Fprintf(w, "  chunk size: %s\n", humanize.IBytes(r.ChunkSize))
	fmt.Fprintf(w, "  exceptions: %s of %s\n", humanize.Comma(int64(r.Exceptions)), humanize.Comma(int64(r.Capacity)))
	fmt.Fprintf(w, "  allocated:  %s of %s (%.1f%%), metadata %s\n", sec(r.AllocatedSectors), sec(r.TotalSectors), r.FillPercent, sec(r.MetadataSectors))
	fmt.Fprintf(w, "  dmsetup:    %s\n", r.Status)
	printLabel(w, r.Label, r.LabelError)
	if r.Warning != "" {
		fmt.Fprintf(w, "  warning:    %s\n", r.Warning)
	}
}

// printLabel prints a COW's label, its absence, or why it cannot be used.
func printLabel(w io.Writer, l *exstore.Label, labelErr string) {
	switch {
	case labelErr != "":
		fmt.Fprintf(w, "  label:      unusable: %s\n", labelErr)
	case l == nil:
		fmt.Fprintf(w, "  label:      none\n")
	default:
		cluster := l.ClusterID
		if cluster == "" {
			cluster = "(none yet)"
		}
		fmt.Fprintf(w, "  uuid:       %s\n", l.UUID)
		fmt.Fprintf(w, "  cluster:    %s\n", cluster)
		if l.Origin.IsZero() {
			fmt.Fprintf(w, "  origin:     (none yet)\n")
		} else {
			fmt.Fprintf(w, "  origin:     %s\n", l.Origin)
		}
	}
}
