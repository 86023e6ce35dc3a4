package volumes

import (
	"strings"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/transient"
	"github.com/clustersnap/clustersnap/persistent"
)

// newRegistry returns the store types a snapshot may use: persistent ("P")
// and transient ("N"), as the kernel's snapshot target knows them.
func newRegistry() *exstore.Registry {
	r := exstore.NewRegistry()
	for _, register := range []func(*exstore.Registry) error{persistent.Register, transient.Register} {
		if err := register(r); err != nil {
			// The two types have distinct names: a clash is a bug here.
			panic(err)
		}
	}
	return r
}

// knownTypes lists the store types with their kernel aliases, for messages.
func knownTypes() string {
	return strings.Join([]string{persistent.TypeName + " (P)", transient.TypeName + " (" + transient.TypeAlias + ")"}, ", ")
}
