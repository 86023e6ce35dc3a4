package volumes

import (
	"errors"
	"fmt"
	"io"
	"net/url"
	"slices"
	"strings"
	"time"

	"github.com/clustersnap/clustersnap/lockc"
)

// Cluster makes the snapshots' stores clustered: each is wrapped by
// clusterized under the lock resource Resource(name), in Engine's
// lockspace Lockspace.
type Cluster struct {
	// ID is the cluster id the nodes serving the same COWs agree on.
	ID string
	// Engine is the lock engine, EngineName its name in NewCluster.
	Engine     lockc.Engine
	EngineName string
	// Lockspace is the lockspace the stores join; "" means clusterized's
	// default.
	Lockspace string
	// Shared says the engine coordinates other hosts (or other processes
	// of this host), so the devices are shared storage: Open then opens
	// them with O_DIRECT, refusing a buffered open (one host's page cache
	// would serve data another host has overwritten), and takes no
	// host-local flock (it would keep this host's other nodes out and
	// means nothing to the other hosts).
	Shared bool
}

// Close closes the lock engine if it holds resources of its own (the etcd
// engine's connection). Call it after the Set that used the Cluster is
// closed.
func (c *Cluster) Close() error {
	if cl, ok := c.Engine.(io.Closer); ok {
		return cl.Close()
	}
	return nil
}

// ClusterOptions are the lock engine's settings beyond its name.
type ClusterOptions struct {
	// Lockspace is the lockspace to join; "" means clusterized's default.
	Lockspace string
	// Etcd configures the etcd engine; it must be zero with any other.
	Etcd EtcdOptions
}

// EtcdOptions are the etcd lock engine's settings, as etcdctl takes them.
type EtcdOptions struct {
	// Endpoints are etcd's client URLs (http://, https://, unix://,
	// unixs://); at least one is required.
	Endpoints []string
	// CAFile is the CA bundle that verifies the servers' certificates;
	// "" means the system's roots (for https:// and unixs:// endpoints).
	CAFile string
	// CertFile and KeyFile are this node's client certificate and key,
	// both or neither.
	CertFile, KeyFile string
	// Prefix is the key prefix of the lockspaces; "" means the engine's
	// default. Every node of a cluster uses the same.
	Prefix string
	// LeaseTTL is the lease's time to live: how long the survivors wait
	// for a dead node's locks; 0 means the engine's default.
	LeaseTTL time.Duration
}

// IsZero reports whether o sets nothing.
func (o EtcdOptions) IsZero() bool {
	return len(o.Endpoints) == 0 && o.CAFile == "" && o.CertFile == "" && o.KeyFile == "" && o.Prefix == "" && o.LeaseTTL == 0
}

// tls reports whether o asks for TLS settings of its own.
func (o EtcdOptions) tls() bool { return o.CAFile != "" || o.CertFile != "" || o.KeyFile != "" }

// check refuses what no connection needs to be made to see: no endpoints,
// an empty or unparsable one, TLS files with a plaintext endpoint (the
// client would silently not use them), half a client key pair, a negative
// TTL.
func (o EtcdOptions) check() error {
	if len(o.Endpoints) == 0 {
		return errors.New("etcd: no endpoints")
	}
	for _, ep := range o.Endpoints {
		if ep == "" {
			return errors.New("etcd: an empty endpoint")
		}
		u, err := url.Parse(ep)
		if err != nil {
			return fmt.Errorf("etcd endpoint %q: %w", ep, err)
		}
		if o.tls() && slices.Contains([]string{"http", "unix"}, u.Scheme) {
			return fmt.Errorf("etcd endpoint %q: plaintext, but TLS files are given (use https:// or unixs://)", ep)
		}
	}
	if (o.CertFile == "") != (o.KeyFile == "") {
		return errors.New("etcd: a client certificate and its key go together")
	}
	if o.LeaseTTL < 0 {
		return fmt.Errorf("etcd: lease TTL %v: want a positive duration", o.LeaseTTL)
	}
	return nil
}

// lockEngine opens a named lock engine: its Engine, and whether it
// coordinates other hosts or processes.
type lockEngine struct {
	name   string
	shared bool
	open   func(o ClusterOptions) (lockc.Engine, error)
}

// LockEngines are the lock engine names NewCluster knows.
func LockEngines() string {
	engines := lockEngines()
	names := make([]string, len(engines))
	for i, e := range engines {
		names[i] = e.name
	}
	return strings.Join(names, ", ")
}

// maxLockspace is the longest lockspace name every engine accepts (the
// DLM's DLM_LOCKSPACE_LEN).
const maxLockspace = 64

// NewCluster checks a cluster id and opens its lock engine by name: "local"
// (or empty) is the in-process engine, which coordinates this process only;
// the others are listed by LockEngines. Options it refuses without opening
// anything (a bad id or lockspace, an unknown engine, etcd options without
// the etcd engine or without endpoints) are a *ConfigError; an engine that
// cannot be set up (a certificate file that cannot be read) is not. No
// engine talks to its servers here: the stores' Open does.
func NewCluster(id, lock string, o ClusterOptions) (*Cluster, error) {
	if id == "" || strings.ContainsAny(id, "/\x00") || len(id) > 32 {
		return nil, &ConfigError{fmt.Errorf("cluster id %q: want 1 to 32 bytes, without '/'", id)}
	}
	if len(o.Lockspace) > maxLockspace || strings.ContainsAny(o.Lockspace, "/\x00") {
		return nil, &ConfigError{fmt.Errorf("lockspace %q: want at most %d bytes, without '/'", o.Lockspace, maxLockspace)}
	}
	if lock == "" {
		lock = "local"
	}
	if lock == etcdEngine {
		if err := o.Etcd.check(); err != nil {
			return nil, &ConfigError{err}
		}
	} else if !o.Etcd.IsZero() {
		return nil, &ConfigError{fmt.Errorf("etcd options given for lock engine %s", lock)}
	}
	for _, e := range lockEngines() {
		if e.name != lock {
			continue
		}
		engine, err := e.open(o)
		if err != nil {
			return nil, fmt.Errorf("lock engine %s: %w", lock, err)
		}
		return &Cluster{ID: id, Engine: engine, EngineName: lock, Lockspace: o.Lockspace, Shared: e.shared}, nil
	}
	return nil, &ConfigError{fmt.Errorf("lock engine %q: unknown (known: %s)", lock, LockEngines())}
}

// Resource is the lock resource of snapshot name's store: one per COW, the
// same on every node that serves it under the same name.
func (c *Cluster) Resource(name string) string { return c.ID + "/" + name }

// OriginResource is the lock resource of the origin's snapshot set
// (package clusterized/snapset). No snapshot's resource is the same: no
// snapshot takes the origin's export name.
func (c *Cluster) OriginResource() string { return c.ID + "/" + OriginExport }
