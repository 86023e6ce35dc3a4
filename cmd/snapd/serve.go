package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/url"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/dustin/go-humanize"

	"github.com/clustersnap/clustersnap/clusterized"
	"github.com/clustersnap/clustersnap/exstore/cow"
	"github.com/clustersnap/clustersnap/lockc/etcd"
	"github.com/clustersnap/clustersnap/nbd"
	"github.com/clustersnap/clustersnap/volumes"
)

// shutdownGrace bounds how long a SIGTERM waits for requests in flight.
const shutdownGrace = 30 * time.Second

// snapshotFlags collects repeated --snapshot flags.
type snapshotFlags []volumes.SnapshotSpec

func (f *snapshotFlags) String() string { return "" }

func (f *snapshotFlags) Set(v string) error {
	spec, err := volumes.ParseSnapshotSpec(v)
	if err != nil {
		return err
	}
	for _, s := range *f {
		if s.Name == spec.Name {
			return fmt.Errorf("%q: snapshot name %q given twice", v, spec.Name)
		}
	}
	*f = append(*f, spec)
	return nil
}

// clusterFlags are the flags that make a cluster member: --cluster-id, the
// lock engine and its settings.
type clusterFlags struct {
	id, lock, lockspace *string
	etcdEndpoints       *string
	etcd                volumes.EtcdOptions
}

// etcdFlagPrefix starts the name of every flag of the etcd engine.
const etcdFlagPrefix = "etcd-"

func newClusterFlags(flags *flag.FlagSet) *clusterFlags {
	c := &clusterFlags{}
	c.id = flags.String("cluster-id", "", "serve the snapshots as members of this cluster: their stores take cluster locks (resource ID/NAME per snapshot), "+
		"and every node must serve the origin with the same --snapshot list (resource ID/origin; a node whose list differs is refused, exit 1)")
	c.lock = flags.String("lock", "", "lock engine with --cluster-id: local (in-process, this snapd only; the default), dlm "+
		"(the Linux kernel DLM: several hosts serve the same devices on shared storage, opened with O_DIRECT; needs corosync and dlm_controld) or etcd "+
		"(an etcd cluster at --etcd-endpoints: several hosts, or several snapd processes of one host, serve the same devices, opened with O_DIRECT)")
	c.lockspace = flags.String("lockspace", "", "lockspace to join with --cluster-id (default "+clusterized.DefaultLockspace+"); every node serving the same devices uses the same")
	c.etcdEndpoints = flags.String(etcdFlagPrefix+"endpoints", "", "with --lock etcd: etcd's client URLs, comma-separated (http://HOST:PORT, https://HOST:PORT, unix:///PATH, unixs:///PATH)")
	flags.StringVar(&c.etcd.CAFile, etcdFlagPrefix+"cacert", "", "with --lock etcd: verify the etcd servers' certificates with this CA bundle (PEM) instead of the system's roots")
	flags.StringVar(&c.etcd.CertFile, etcdFlagPrefix+"cert", "", "with --lock etcd: this node's client certificate (PEM), with --etcd-key")
	flags.StringVar(&c.etcd.KeyFile, etcdFlagPrefix+"key", "", "with --lock etcd: the key of --etcd-cert (PEM)")
	flags.StringVar(&c.etcd.Prefix, etcdFlagPrefix+"prefix", "", "with --lock etcd: the key prefix of the lockspaces (default "+etcd.DefaultPrefix+"); every node of the cluster uses the same")
	flags.DurationVar(&c.etcd.LeaseTTL, etcdFlagPrefix+"lease-ttl", 0, fmt.Sprintf("with --lock etcd: the lease's time to live, whole seconds (default %v): how long the other nodes wait for the locks of a node that died; "+
		"a node that cannot renew its lease stops its I/O before it expires", etcd.DefaultTTL))
	return c
}

// cluster turns the parsed flags into the volumes' cluster: none without a
// cluster id. given is the set of flags given on the command line;
// buffered says --direct=false was given. A lock engine that coordinates
// other hosts or processes needs O_DIRECT, so buffered is refused with it;
// etcd flags without --lock etcd are refused.
func (c *clusterFlags) cluster(given map[string]bool, buffered bool) (*volumes.Cluster, error) {
	var etcdGiven []string
	for name := range given {
		if strings.HasPrefix(name, etcdFlagPrefix) {
			etcdGiven = append(etcdGiven, "--"+name)
		}
	}
	slices.Sort(etcdGiven)
	if *c.id == "" {
		if *c.lock != "" || *c.lockspace != "" || len(etcdGiven) > 0 {
			return nil, usagef("--lock, --lockspace and --etcd-* need --cluster-id")
		}
		return nil, nil
	}
	if *c.lock != "etcd" && len(etcdGiven) > 0 {
		return nil, usagef("%s: only with --lock etcd", strings.Join(etcdGiven, ", "))
	}
	if *c.lock == "etcd" && *c.etcdEndpoints == "" {
		return nil, usagef("--lock etcd needs --etcd-endpoints")
	}
	o := volumes.ClusterOptions{Lockspace: *c.lockspace}
	if *c.lock == "etcd" {
		o.Etcd = c.etcd
		o.Etcd.Endpoints = strings.Split(*c.etcdEndpoints, ",")
	}
	cl, err := volumes.NewCluster(*c.id, *c.lock, o)
	if errors.As(err, new(*volumes.ConfigError)) {
		return nil, usageError{err}
	}
	if err != nil {
		return nil, err
	}
	if cl.Shared && buffered {
		_ = cl.Close()
		return nil, usagef("--direct=false: lock engine %s shares the devices with other nodes, so they must be opened with O_DIRECT (this host's page cache would hide the other nodes' writes)", cl.EngineName)
	}
	return cl, nil
}

// openVolumes opens the volumes of c, a refusal of c itself being a usage
// error.
func openVolumes(ctx context.Context, c volumes.Config) (*volumes.Set, error) {
	v, err := volumes.Open(ctx, c)
	if errors.As(err, new(*volumes.ConfigError)) {
		return nil, usageError{err}
	}
	return v, err
}

// serveConfig is where and how snapd serves.
type serveConfig struct {
	listen, socket string
	tlsMode        nbd.TLSMode
	tls            *tls.Config
	defaultExport  string
	stdio          bool          // one client on os.Stdin/os.Stdout
	control        string        // control socket path, "" for none
	statsInterval  time.Duration // how often a clustered server logs its counters
}

func runServe(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	flags := newFlags("serve", "--origin PATH --snapshot "+volumes.SnapshotSyntax+"... [--listen ADDR] [--socket PATH] [--tls MODE --tls-dir DIR]", stderr)
	origin := flags.String("origin", "", "origin image or block device")
	var specs snapshotFlags
	flags.Var(&specs, "snapshot", "a snapshot to serve, "+volumes.SnapshotSyntax+"; repeat for several. "+
		"ro: read-only; overflow: a full COW fails writes instead of invalidating the snapshot; "+
		"type: the store, P (persistent, the default) or N (transient: exceptions kept in memory and lost when snapd stops, for throwaway snapshots; not with --cluster-id); "+
		"chunk: the chunk size, e.g. 4KiB, required with type=N")
	listen := flags.String("listen", "127.0.0.1:10809", "TCP address to serve on; empty for none (ignored under socket activation)")
	socket := flags.String("socket", "", "unix socket to serve on (ignored under socket activation)")
	direct := flags.Bool("direct", false, "open devices with O_DIRECT (bypass the page cache)")
	tlsMode := flags.String("tls", "off", "TLS: off, allow (clients may STARTTLS) or require")
	tlsDir := flags.String("tls-dir", "", "directory with server-cert.pem, server-key.pem (and ca-cert.pem with --tls-verify-clients), as qemu-nbd and nbdkit use")
	verifyClients := flags.Bool("tls-verify-clients", false, "require client certificates signed by the directory's ca-cert.pem")
	stdio := flags.Bool("stdio", false, "serve one client on stdin/stdout (inetd, libnbd's connect_command) instead of listening")
	defaultExport := flags.String("default-export", "", "export also served under the empty name (what nbd-client without -N and 'nbdinfo -- [ snapd serve ... ]' ask for)")
	clusterOpts := newClusterFlags(flags)
	originID := flags.String("origin-id", "", "the origin's id in the COW labels, instead of the serial or WWID the kernel reports for it (for an origin whose id differs between the hosts serving it)")
	controlPath := flags.String("control", "", "serve the management protocol on this unix socket (mode 0600): snapd status --control PATH reports the running server, snapd snapshot create|delete|list --control PATH change its snapshots live")
	catalog := flags.String("catalog", "", "the origin's snapshot catalog (created as a 128 KiB file if missing): live snapshot changes are recorded there, and a restarted server serves what it lists; "+
		"with --cluster-id, every node names the same catalog on shared storage, and live changes need it")
	mergeStep := flags.String("merge-step", "", fmt.Sprintf("with --cluster-id: a live merge run on this node (snapd merge --control) merges at most this much per step, e.g. 1MiB (default %s); "+
		"every node's origin writes wait while a step runs, so a smaller step holds them for less time and the merge takes longer", humanize.IBytes(volumes.ClusterMergeStep)))
	statsInterval := flags.Duration("stats-interval", 10*time.Minute, "with --cluster-id, log the lock and metadata counters this often (and at exit); 0 logs them only at exit")
	if err := parse(flags, args); err != nil {
		return err
	}
	given := map[string]bool{}
	flags.Visit(func(f *flag.Flag) { given[f.Name] = true })
	cluster, err := clusterOpts.cluster(given, given["direct"] && !*direct)
	if err != nil {
		return err
	}
	if cluster != nil {
		defer cluster.Close()
	}
	if *origin == "" {
		return usagef("--origin is required")
	}
	cfg := serveConfig{listen: *listen, socket: *socket, defaultExport: *defaultExport, stdio: *stdio, control: *controlPath, statsInterval: *statsInterval}
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
	var step uint64
	if given["merge-step"] {
		if step, err = humanize.ParseBytes(*mergeStep); err != nil || step == 0 || step > math.MaxInt64 {
			return usagef("--merge-step %q: want a positive size, e.g. 1MiB", *mergeStep)
		}
	}
	v, err := openVolumes(ctx, volumes.Config{Origin: *origin, Snapshots: specs, Direct: *direct, Cluster: cluster, OriginID: *originID, Catalog: *catalog, MergeStep: int64(step)})
	if err != nil {
		return err
	}
	defer v.Close()
	return serveVolumes(ctx, v, cfg, stdout, stderr)
}

// serveVolumes serves v until ctx ends (SIGINT, SIGTERM), then drains the
// requests in flight, flushes and returns. Sockets passed by systemd-style
// socket activation (LISTEN_FDS) replace --listen and --socket.
func serveVolumes(ctx context.Context, v *volumes.Set, cfg serveConfig, stdout, stderr io.Writer) error {
	exports, err := v.Exports(cfg.defaultExport)
	if errors.Is(err, volumes.ErrNoSuchExport) {
		return usagef("--default-export %q: no such export", cfg.defaultExport)
	}
	if err != nil {
		return err
	}
	// The control socket and the counters' log stop with the server.
	ctx, stopSide := context.WithCancel(ctx)
	defer stopSide()
	nbdOpts := nbd.Options{
		TLSMode: cfg.tlsMode,
		TLS:     cfg.tls,
		Logger:  slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	}
	srv := nbd.NewServer(exports, nbdOpts)
	// Snapshots created and deleted live are served there; the control
	// socket, which takes those requests, opens only now.
	v.Export(srv, cfg.defaultExport)
	if cfg.control != "" {
		waitControl, err := startControl(ctx, v, cfg.control)
		if err != nil {
			return err
		}
		defer func() { stopSide(); _ = waitControl() }()
	}
	if m, p, ok := v.Merging(); ok && v.Status().Cluster == nil {
		// The origin is in merge mode since Open (a merge was under way
		// when snapd stopped): finish it while serving.
		if _, err := v.StartMerge(ctx, ""); err != nil {
			return err
		}
		fmt.Fprintf(stderr, "resuming the merge of snapshot %s into the origin (%s of %s exceptions merged)\n", m.Name(), humanize.Comma(int64(p.Done)), humanize.Comma(int64(p.Total)))
	} else if ok {
		// In a cluster one node runs the merge; the operator picks it.
		fmt.Fprintf(stderr, "the origin is in merge mode with snapshot %s (%s of %s exceptions merged); to finish the merge, run on one node: snapd merge --control PATH --snapshot %s\n",
			m.Name(), humanize.Comma(int64(p.Done)), humanize.Comma(int64(p.Total)), m.Name())
	}
	if c := v.Status().Cluster; c != nil {
		fmt.Fprintf(stderr, "cluster %s: node %d, lock engine %s, lockspace %s\n", c.ID, c.NodeID, c.Engine, c.Lockspace)
		logged := make(chan struct{})
		go func() { defer close(logged); logClusterStats(ctx, v, cfg.statsInterval, stderr) }()
		defer func() { stopSide(); <-logged; writeClusterStats(v, stderr) }()
	}
	if cfg.stdio {
		return serveStdio(ctx, v, srv, stderr)
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
			l, err := nbd.ListenUnix(cfg.socket)
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
	var lost error
	select {
	case <-ctx.Done():
	case err := <-errc:
		return fmt.Errorf("serve: %w", err)
	case <-v.Lost():
		// The devices refuse all I/O already; stop serving so that a
		// supervisor restarts snapd, which then rejoins the cluster.
		lost = fmt.Errorf("this node lost its cluster lockspace: I/O to the shared devices stopped, clients get I/O errors; restart snapd to rejoin: %w", volumes.ErrClusterLost)
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), shutdownGrace)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	if lost != nil {
		return lost
	}
	if err := v.Origin.Flush(sctx); err != nil {
		return fmt.Errorf("final flush: %w", err)
	}
	for _, s := range v.Snapshots() {
		fmt.Fprintf(stdout, "snapshot %s\n", statusOf(s))
	}
	fmt.Fprintln(stdout, "stopped")
	return nil
}

// serveStdio serves one client on stdin/stdout, which carry the protocol,
// so everything snapd says goes to stderr.
func serveStdio(ctx context.Context, v *volumes.Set, srv *nbd.Server, stderr io.Writer) error {
	if err := srv.ServeStdio(ctx, os.Stdin, os.Stdout); err != nil && !errors.Is(err, context.Canceled) {
		return fmt.Errorf("serve on stdin/stdout: %w", err)
	}
	if err := v.Origin.Flush(context.WithoutCancel(ctx)); err != nil {
		return fmt.Errorf("final flush: %w", err)
	}
	for _, s := range v.Snapshots() {
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
