package volumes

import (
	"github.com/clustersnap/clustersnap/lockc"
	"github.com/clustersnap/clustersnap/lockc/dlm"
	"github.com/clustersnap/clustersnap/lockc/inproc"
)

// lockEngines are the engines NewCluster opens by name.
func lockEngines() []lockEngine {
	return []lockEngine{
		{name: "local", open: func() (lockc.Engine, error) { return inproc.New(), nil }},
		// The kernel DLM: its nodes are other hosts. Opening the engine
		// touches nothing; joining a lockspace (when the stores open)
		// fails with a clear error without the module or dlm_controld.
		{name: "dlm", shared: true, open: func() (lockc.Engine, error) { return dlm.New(dlm.Options{}), nil }},
	}
}
