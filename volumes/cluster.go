package volumes

import (
	"fmt"
	"strings"

	"github.com/clustersnap/clustersnap/lockc"
	"github.com/clustersnap/clustersnap/lockc/inproc"
)

// Cluster makes the snapshots' stores clustered: each is wrapped by
// clusterized under the lock resource Resource(name), in Engine's
// lockspace.
type Cluster struct {
	// ID is the cluster id the nodes serving the same COWs agree on.
	ID string
	// Engine is the lock engine.
	Engine lockc.Engine
}

// LockEngines are the lock engine names NewCluster knows.
const LockEngines = "local"

// NewCluster checks a cluster id and names its lock engine: "local" (or
// empty) is the in-process engine, which coordinates this process only.
func NewCluster(id, lock string) (*Cluster, error) {
	if id == "" || strings.ContainsAny(id, "/\x00") || len(id) > 32 {
		return nil, fmt.Errorf("cluster id %q: want 1 to 32 bytes, without '/'", id)
	}
	switch lock {
	case "", "local":
		return &Cluster{ID: id, Engine: inproc.New()}, nil
	}
	return nil, fmt.Errorf("lock engine %q: unknown (known: %s)", lock, LockEngines)
}

// Resource is the lock resource of snapshot name's store: one per COW, the
// same on every node that serves it under the same name.
func (c *Cluster) Resource(name string) string { return c.ID + "/" + name }
