package volumes

import (
	"crypto/tls"
	"fmt"

	"go.etcd.io/etcd/client/pkg/v3/transport"

	"github.com/clustersnap/clustersnap/lockc"
	"github.com/clustersnap/clustersnap/lockc/dlm"
	"github.com/clustersnap/clustersnap/lockc/etcd"
	"github.com/clustersnap/clustersnap/lockc/inproc"
)

// etcdEngine is the etcd engine's name, the one engine ClusterOptions.Etcd
// configures.
const etcdEngine = "etcd"

// lockEngines are the engines NewCluster opens by name.
func lockEngines() []lockEngine {
	return []lockEngine{
		{name: "local", open: func(ClusterOptions) (lockc.Engine, error) { return inproc.New(), nil }},
		// The kernel DLM: its nodes are other hosts. Opening the engine
		// touches nothing; joining a lockspace (when the stores open)
		// fails with a clear error without the module or dlm_controld.
		{name: "dlm", shared: true, open: func(ClusterOptions) (lockc.Engine, error) { return dlm.New(dlm.Options{}), nil }},
		// etcd: its nodes are whatever reaches the etcd cluster, other
		// hosts or other processes of this one. Opening the engine
		// reads the TLS files but does not wait for a server; joining a
		// lockspace does.
		{name: etcdEngine, shared: true, open: openEtcd},
	}
}

// openEtcd makes the etcd engine of o.Etcd, with the TLS settings
// etcdctl's --cacert, --cert and --key would make.
func openEtcd(o ClusterOptions) (lockc.Engine, error) {
	var tc *tls.Config
	if o.Etcd.tls() {
		info := transport.TLSInfo{TrustedCAFile: o.Etcd.CAFile, CertFile: o.Etcd.CertFile, KeyFile: o.Etcd.KeyFile}
		var err error
		if tc, err = info.ClientConfig(); err != nil {
			return nil, fmt.Errorf("TLS: %w", err)
		}
	}
	return etcd.New(etcd.Options{Endpoints: o.Etcd.Endpoints, TLS: tc, Prefix: o.Etcd.Prefix, TTL: o.Etcd.LeaseTTL})
}
