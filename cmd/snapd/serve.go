package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/clustersnap/clustersnap/clusterized"
	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/exstore/cow"
	"github.com/clustersnap/clustersnap/lockc"
	"github.com/clustersnap/clustersnap/lockc/inproc"
	"github.com/clustersnap/clustersnap/nbd"
	"github.com/clustersnap/clustersnap/persistent"
)

// originExport is the export name of the origin volume.
const originExport = "origin"

// shutdownGrace bounds how long a SIGTERM waits for requests in flight.
const shutdownGrace = 30 * time.Second

// snapshotSpec is one --snapshot NAME=COW[,ro][,overflow].
type snapshotSpec struct {
	name, cow string
	opts      cow.SnapshotOptions
}

// snapshotFlags collects repeated --snapshot flags.
type snapshotFlags []snapshotSpec

func (f *snapshotFlags) String() string { return "" }

func (f *snapshotFlags) Set(v string) error {
	name, rest, ok := strings.Cut(v, "=")
	if !ok || name == "" || rest == "" {
		return fmt.Errorf("%q: want NAME=COW[,ro][,overflow]", v)
	}
	parts := strings.Split(rest, ",")
	spec := snapshotSpec{name: name, cow: parts[0]}
	for _, o := range parts[1:] {
		switch o {
		case "ro":
			spec.opts.ReadOnly = true
		case "overflow":
			spec.opts.Overflow = true
		default:
			return fmt.Errorf("%q: unknown snapshot option %q (ro, overflow)", v, o)
		}
	}
	if name == originExport {
		return fmt.Errorf("%q: the name %q is the origin's export", v, originExport)
	}
	for _, s := range *f {
		if s.name == name {
			return fmt.Errorf("%q: snapshot name %q given twice", v, name)
		}
	}
	*f = append(*f, spec)
	return nil
}

// volumes is an origin and its snapshots, opened for serving.
type volumes struct {
	origin  *cow.Origin
	snaps   []*cow.Snapshot
	closers []io.Closer // stores, then devices, in closing order
}

// clusterConfig makes the snapshots' stores clustered: each is wrapped by
// clusterized under the lock resource of cluster id and snapshot name, in
// the lock engine's lockspace.
type clusterConfig struct {
	id     string
	engine lockc.Engine
}

// lockEngines are the --lock values snapd knows.
const lockEngines = "local"

// newClusterConfig checks --cluster-id and --lock. Without a cluster id
// the stores are plain persistent ones (nil).
func newClusterConfig(id, lock string) (*clusterConfig, error) {
	if id == "" {
		if lock != "" {
			return nil, usagef("--lock needs --cluster-id")
		}
		return nil, nil
	}
	if strings.ContainsAny(id, "/\x00") || len(id) > 32 {
		return nil, usagef("--cluster-id %q: at most 32 bytes, without '/'", id)
	}
	switch lock {
	case "", "local":
		return &clusterConfig{id: id, engine: inproc.New()}, nil
	}
	return nil, usagef("--lock %q: unknown lock engine (known: %s)", lock, lockEngines)
}

// resource is the cluster id of snapshot name's store: one lock resource
// per COW, the same on every node that serves it under the same name.
func (c *clusterConfig) resource(name string) string { return c.id + "/" + name }

// openVolumes opens the origin and every snapshot's COW with exclusive
// locks, so that no second snapd on this host serves them at once. With a
// cluster the stores are clustered; the in-process lock engine ("local")
// coordinates one process only, so the exclusive locks stay.
func openVolumes(ctx context.Context, originPath string, specs []snapshotSpec, direct bool, cluster *clusterConfig) (*volumes, error) {
	v := &volumes{}
	fail := func(err error) (*volumes, error) {
		v.Close()
		return nil, err
	}
	oi, err := os.Stat(originPath)
	if err != nil {
		return nil, fmt.Errorf("origin: %w", err)
	}
	od, err := blockdev.Open(originPath, blockdev.Options{Direct: direct, Exclusive: true})
	if err != nil {
		return nil, fmt.Errorf("origin: %w", err)
	}
	v.closers = append(v.closers, od)
	v.origin = cow.NewOrigin(od)
	for _, spec := range specs {
		if ci, err := os.Stat(spec.cow); err == nil && os.SameFile(oi, ci) {
			return fail(fmt.Errorf("snapshot %s: cow %s is the origin itself", spec.name, spec.cow))
		}
		cd, err := blockdev.Open(spec.cow, blockdev.Options{Direct: direct, Exclusive: true})
		if err != nil {
			return fail(fmt.Errorf("snapshot %s: %w", spec.name, err))
		}
		v.closers = append([]io.Closer{cd}, v.closers...)
		var st exstore.Store
		if cluster != nil {
			var cs *clusterized.Store
			open := func(ctx context.Context, dev blockdev.Device) (exstore.Store, error) {
				return persistent.Open(ctx, dev, persistent.Options{NoFormat: true})
			}
			if cs, err = clusterized.Open(ctx, cd, open, cluster.engine, cluster.resource(spec.name), clusterized.Options{}); err == nil {
				st = cs.Exstore() // with lazy commits, as the bare store has them
			}
		} else {
			st, err = persistent.Open(ctx, cd, persistent.Options{NoFormat: true})
		}
		if err != nil {
			return fail(fmt.Errorf("snapshot %s: %w", spec.name, err))
		}
		v.closers = append([]io.Closer{st}, v.closers...)
		s, err := v.origin.AddSnapshot(spec.name, st, cd, spec.opts)
		if err != nil {
			return fail(fmt.Errorf("snapshot %s: %w", spec.name, err))
		}
		v.snaps = append(v.snaps, s)
	}
	return v, nil
}

// Close closes the stores, then the devices.
func (v *volumes) Close() error {
	var errs []error
	for _, c := range v.closers {
		errs = append(errs, c.Close())
	}
	return errors.Join(errs...)
}

// exports lists the NBD exports: the origin, then one per snapshot, and the
// default export (the empty name) if one is named. Every connection shares
// one volume whose Flush syncs the devices, so a flush on one connection
// covers writes completed on all: multi-conn is safe.
func (v *volumes) exports(defaultExport string) ([]nbd.Export, error) {
	ex := []nbd.Export{{Name: originExport, Description: "origin " + v.origin.Device().Name(), Backend: originBackend{v.origin}, MultiConn: true}}
	for _, s := range v.snaps {
		desc := fmt.Sprintf("snapshot of %s in %s", v.origin.Device().Name(), s.COW().Name())
		ex = append(ex, nbd.Export{Name: s.Name(), Description: desc, Backend: snapshotBackend{s}, ReadOnly: s.Options().ReadOnly, MultiConn: true})
	}
	if defaultExport != "" {
		for _, e := range ex {
			if e.Name == defaultExport {
				e.Name, e.Description = "", e.Description+" (default export)"
				return append(ex, e), nil
			}
		}
		return nil, usagef("--default-export %q: no such export", defaultExport)
	}
	return ex, nil
}

// snapshotBackend serves a snapshot, adding the changed-block map: which
// ranges live in the COW (the clustersnap:exceptions meta context). The
// engine does not know about NBD; this is where the two meet.
type snapshotBackend struct{ *cow.Snapshot }

// COWExtents implements nbd.COWMapper.
func (b snapshotBackend) COWExtents(ctx context.Context, off, length int64) ([]nbd.COWExtent, error) {
	ext, err := b.Extents(ctx, off, length)
	if err != nil {
		return nil, err
	}
	out := make([]nbd.COWExtent, len(ext))
	for i, e := range ext {
		out[i] = nbd.COWExtent{Length: e.Length, InCOW: e.InCOW}
	}
	return out, nil
}

// WriteZeroes implements nbd.Zeroer. Zeroing a snapshot allocates and
// writes like any write, so it is never the fast kind.
func (b snapshotBackend) WriteZeroes(ctx context.Context, off, length int64, o nbd.ZeroOptions) error {
	if o.Fast {
		return nbd.ErrZeroNotFast
	}
	return b.Snapshot.WriteZeroes(ctx, off, length, o.NoHole, o.FUA)
}

// originBackend serves the origin; Trim comes from cow.Origin as it is.
type originBackend struct{ *cow.Origin }

// WriteZeroes implements nbd.Zeroer. The snapshots' copies cost as much as
// writes, so a request that must be fast is refused.
func (b originBackend) WriteZeroes(ctx context.Context, off, length int64, o nbd.ZeroOptions) error {
	if o.Fast {
		return nbd.ErrZeroNotFast
	}
	return b.Origin.WriteZeroes(ctx, off, length, o.NoHole, o.FUA)
}

// serveConfig is where and how snapd serves.
type serveConfig struct {
	listen, socket string
	tlsMode        nbd.TLSMode
	tls            *tls.Config
	defaultExport  string
	stdio          bool // one client on os.Stdin/os.Stdout
}

func runServe(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	flags := newFlags("serve", "--origin PATH --snapshot NAME=COW[,ro][,overflow]... [--listen ADDR] [--socket PATH] [--tls MODE --tls-dir DIR]", stderr)
	origin := flags.String("origin", "", "origin image or block device")
	var specs snapshotFlags
	flags.Var(&specs, "snapshot", "a snapshot to serve, NAME=COW[,ro][,overflow]; repeat for several")
	listen := flags.String("listen", "127.0.0.1:10809", "TCP address to serve on; empty for none (ignored under socket activation)")
	socket := flags.String("socket", "", "unix socket to serve on (ignored under socket activation)")
	direct := flags.Bool("direct", false, "open devices with O_DIRECT (bypass the page cache)")
	tlsMode := flags.String("tls", "off", "TLS: off, allow (clients may STARTTLS) or require")
	tlsDir := flags.String("tls-dir", "", "directory with server-cert.pem, server-key.pem (and ca-cert.pem with --tls-verify-clients), as qemu-nbd and nbdkit use")
	verifyClients := flags.Bool("tls-verify-clients", false, "require client certificates signed by the directory's ca-cert.pem")
	stdio := flags.Bool("stdio", false, "serve one client on stdin/stdout (inetd, libnbd's connect_command) instead of listening")
	defaultExport := flags.String("default-export", "", "export also served under the empty name (what nbd-client without -N and 'nbdinfo -- [ snapd serve ... ]' ask for)")
	clusterID := flags.String("cluster-id", "", "serve the snapshots as members of this cluster: their stores take cluster locks (resource ID/NAME per snapshot)")
	lock := flags.String("lock", "", "lock engine with --cluster-id: local (in-process, this snapd only; the default)")
	if err := parse(flags, args); err != nil {
		return err
	}
	cluster, err := newClusterConfig(*clusterID, *lock)
	if err != nil {
		return err
	}
	if *origin == "" {
		return usagef("--origin is required")
	}
	cfg := serveConfig{listen: *listen, socket: *socket, defaultExport: *defaultExport, stdio: *stdio}
	mode, err := nbd.ParseTLSMode(*tlsMode)
	if err != nil {
		return usagef("--tls: %v", err)
	}
	if mode != nbd.TLSOff {
		if *tlsDir == "" {
			return usagef("--tls %s needs --tls-dir", *tlsMode)
		}
		if cfg.tls, err = nbd.TLSConfigFromDir(*tlsDir, *verifyClients); err != nil {
			return err
		}
		cfg.tlsMode = mode
	}
	v, err := openVolumes(ctx, *origin, specs, *direct, cluster)
	if err != nil {
		return err
	}
	defer v.Close()
	return serveVolumes(ctx, v, cfg, stdout, stderr)
}

// serveVolumes serves v until ctx ends (SIGINT, SIGTERM), then drains the
// requests in flight, flushes and returns. Sockets passed by systemd-style
// socket activation (LISTEN_FDS) replace --listen and --socket.
func serveVolumes(ctx context.Context, v *volumes, cfg serveConfig, stdout, stderr io.Writer) error {
	exports, err := v.exports(cfg.defaultExport)
	if err != nil {
		return err
	}
	if cfg.stdio {
		return serveStdio(ctx, v, exports, cfg, stderr)
	}
	listeners, err := nbd.ListenersFromEnv()
	if err != nil {
		return err
	}
	defer func() {
		for _, l := range listeners {
			l.Close()
		}
	}()
	scheme := map[bool]string{false: "nbd", true: "nbds"}[cfg.tlsMode != nbd.TLSOff]
	var uris []func(name string) string
	var attach []string
	if len(listeners) > 0 {
		// The service manager (or libnbd's 'nbdinfo -- [ ... ]') owns
		// stdout; say what we do on stderr.
		stdout = stderr
		fmt.Fprintf(stdout, "socket activated: serving on %d inherited sockets\n", len(listeners))
	} else {
		if cfg.listen == "" && cfg.socket == "" {
			return usagef("give --listen or --socket")
		}
		if cfg.listen != "" {
			l, err := net.Listen("tcp", cfg.listen)
			if err != nil {
				return err
			}
			listeners = append(listeners, l)
			addr := l.Addr().(*net.TCPAddr)
			uris = append(uris, func(name string) string {
				return (&url.URL{Scheme: scheme, Host: addr.String(), Path: "/" + name}).String()
			})
			attach = append(attach, fmt.Sprintf("nbd-client -N NAME %s %d /dev/nbd0 -b 4096", addr.IP, addr.Port))
		}
		if cfg.socket != "" {
			l, err := net.Listen("unix", cfg.socket)
			if err != nil {
				return err
			}
			listeners = append(listeners, l)
			uris = append(uris, func(name string) string {
				return (&url.URL{Scheme: scheme + "+unix", Path: "/" + name, RawQuery: "socket=" + cfg.socket}).String()
			})
			attach = append(attach, fmt.Sprintf("nbd-client -N NAME -unix %s /dev/nbd0 -b 4096", cfg.socket))
		}
	}
	srv := nbd.NewServer(exports, nbd.Options{
		TLSMode: cfg.tlsMode,
		TLS:     cfg.tls,
		Logger:  slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	})

	fmt.Fprintln(stdout, "serving:")
	for _, ex := range exports {
		var us []string
		for _, u := range uris {
			us = append(us, u(ex.Name))
		}
		fmt.Fprintf(stdout, "  %-10s %s\n", ex.Name, strings.Join(us, "  "))
	}
	for _, a := range attach {
		fmt.Fprintf(stdout, "attach with: %s\n", a)
	}
	fmt.Fprintln(stdout, "stop with SIGINT or SIGTERM (requests in flight are completed and flushed)")

	errc := make(chan error, len(listeners))
	for _, l := range listeners {
		go func() { errc <- srv.Serve(context.WithoutCancel(ctx), l) }()
	}
	select {
	case <-ctx.Done():
	case err := <-errc:
		return fmt.Errorf("serve: %w", err)
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), shutdownGrace)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	if err := v.origin.Flush(sctx); err != nil {
		return fmt.Errorf("final flush: %w", err)
	}
	for _, s := range v.snaps {
		fmt.Fprintf(stdout, "snapshot %s\n", statusOf(s))
	}
	fmt.Fprintln(stdout, "stopped")
	return nil
}

// serveStdio serves one client on stdin/stdout, which carry the protocol,
// so everything snapd says goes to stderr.
func serveStdio(ctx context.Context, v *volumes, exports []nbd.Export, cfg serveConfig, stderr io.Writer) error {
	srv := nbd.NewServer(exports, nbd.Options{
		TLSMode: cfg.tlsMode,
		TLS:     cfg.tls,
		Logger:  slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	if err := srv.ServeStdio(ctx, os.Stdin, os.Stdout); err != nil && !errors.Is(err, context.Canceled) {
		return fmt.Errorf("serve on stdin/stdout: %w", err)
	}
	if err := v.origin.Flush(context.WithoutCancel(ctx)); err != nil {
		return fmt.Errorf("final flush: %w", err)
	}
	for _, s := range v.snaps {
		fmt.Fprintf(stderr, "snapshot %s\n", statusOf(s))
	}
	return nil
}

// statusOf is a one-line summary of a served snapshot's store.
func statusOf(s *cow.Snapshot) string {
	u := s.Store().Usage()
	state := "valid"
	if err := s.Err(); err != nil {
		state = err.Error()
	}
	return fmt.Sprintf("%s: %d exceptions, %s, %s", s.Name(), u.Exceptions, u.String(), state)
}
