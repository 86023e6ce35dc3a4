package volumes

import (
	"github.com/clustersnap/clustersnap/lockc"
	"github.com/clustersnap/clustersnap/lockc/inproc"
)

// lockEngines are the engines NewCluster opens by name.
func lockEngines() []lockEngine {
	return []lockEngine{
		{name: "local", open: func() (lockc.Engine, error) { return inproc.New(), nil }},
	}
}
