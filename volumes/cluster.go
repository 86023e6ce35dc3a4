package volumes

import (
	"fmt"
	"strings"

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
	// Shared says the engine coordinates other hosts, so the devices are
	// shared storage: Open then opens them with O_DIRECT, refusing a
	// buffered open (one host's page cache would serve data another host
	// has overwritten), and takes no host-local flock (it means nothing to
	// the other hosts).
	Shared bool
}

// ClusterOptions are the lock engine's settings beyond its name.
type ClusterOptions struct {
	// Lockspace is the lockspace to join; "" means clusterized's default.
	Lockspace string
}

// lockEngine opens a named lock engine: its Engine, and whether it
// coordinates other hosts.
type lockEngine struct {
	name   string
	shared bool
	open   func() (lockc.Engine, error)
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
// the others are listed by LockEngines.
func NewCluster(id, lock string, o ClusterOptions) (*Cluster, error) {
	if id == "" || strings.ContainsAny(id, "/\x00") || len(id) > 32 {
		return nil, fmt.Errorf("cluster id %q: want 1 to 32 bytes, without '/'", id)
	}
	if len(o.Lockspace) > maxLockspace || strings.ContainsAny(o.Lockspace, "/\x00") {
		return nil, fmt.Errorf("lockspace %q: want at most %d bytes, without '/'", o.Lockspace, maxLockspace)
	}
	if lock == "" {
		lock = "local"
	}
	for _, e := range lockEngines() {
		if e.name != lock {
			continue
		}
		engine, err := e.open()
		if err != nil {
			return nil, fmt.Errorf("lock engine %s: %w", lock, err)
		}
		return &Cluster{ID: id, Engine: engine, EngineName: lock, Lockspace: o.Lockspace, Shared: e.shared}, nil
	}
	return nil, fmt.Errorf("lock engine %q: unknown (known: %s)", lock, LockEngines())
}

// Resource is the lock resource of snapshot name's store: one per COW, the
// same on every node that serves it under the same name.
func (c *Cluster) Resource(name string) string { return c.ID + "/" + name }

// OriginResource is the lock resource of the origin's snapshot set
// (package clusterized/snapset). No snapshot's resource is the same: no
// snapshot takes the origin's export name.
func (c *Cluster) OriginResource() string { return c.ID + "/" + OriginExport }
