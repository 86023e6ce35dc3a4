package persistent

import (
	"context"
	"fmt"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
)

// Register adds the "persistent" type (alias "P") to r.
func Register(r *exstore.Registry) error {
	return r.Register(exstore.Type{
		Name:    TypeName,
		Aliases: []string{"P"},
		Usage:   "no parameters",
		Open: func(ctx context.Context, cow blockdev.Device, args exstore.Args) (exstore.Store, error) {
			if len(args.Params) != 0 {
				return nil, fmt.Errorf("cow %s: persistent store takes no parameters, got %q", cow.Name(), args.Params)
			}
			return Open(ctx, cow, Options{ChunkSectors: args.ChunkSectors, NoFormat: args.NoFormat})
		},
	})
}
