package exstore

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"

	"github.com/clustersnap/clustersnap/exstore/blockdev"
)

// Args are what a store type is opened with, as the kernel passes a
// snapshot table's "<type> <chunk_size>" and any type-specific words.
type Args struct {
	// ChunkSectors is the requested chunk size in sectors; 0 means "the
	// store's own": the header's for an existing persistent store, the
	// type's default otherwise.
	ChunkSectors uint32
	// Params are type-specific arguments, for example a cluster id.
	Params []string
	// NoFormat asks for an existing store: a type that would format a
	// device without one refuses it instead. A server sets it, so that a
	// mistyped path is never formatted; a clustered node always does.
	NoFormat bool
}

// OpenFunc opens (or, for a new COW device, formats) a store on cow.
type OpenFunc func(ctx context.Context, cow blockdev.Device, args Args) (Store, error)

// Type is a registered store type.
type Type struct {
	Name    string   // "persistent"
	Aliases []string // kernel-style short names, e.g. "P"
	Usage   string   // one line describing Params
	Open    OpenFunc
}

// Registry maps store type names to their constructors, like the kernel's
// list of exception-store types. A program builds one and registers the types
// it links in; there is no global registry.
type Registry struct {
	mu    sync.RWMutex
	types map[string]Type // by lower-case name and alias
}

// NewRegistry returns an empty registry.
func NewRegistry() *Registry { return &Registry{types: make(map[string]Type)} }

// Register adds t under its name and aliases. A name already taken is an
// error.
func (r *Registry) Register(t Type) error {
	if t.Name == "" || t.Open == nil {
		return fmt.Errorf("exstore: register: type needs a name and an Open function")
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	names := append([]string{t.Name}, t.Aliases...)
	for _, n := range names {
		if _, dup := r.types[strings.ToLower(n)]; dup {
			return fmt.Errorf("exstore: register %q: name %q is already registered", t.Name, n)
		}
	}
	for _, n := range names {
		r.types[strings.ToLower(n)] = t
	}
	return nil
}

// Lookup returns the type registered under name or alias (case-insensitive).
func (r *Registry) Lookup(name string) (Type, bool) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	t, ok := r.types[strings.ToLower(name)]
	return t, ok
}

// Open opens a store of the named type on cow.
func (r *Registry) Open(ctx context.Context, name string, cow blockdev.Device, args Args) (Store, error) {
	t, ok := r.Lookup(name)
	if !ok {
		return nil, fmt.Errorf("exstore: unknown store type %q (known: %s)", name, strings.Join(r.Names(), ", "))
	}
	s, err := t.Open(ctx, cow, args)
	if err != nil {
		return nil, fmt.Errorf("%s store: %w", t.Name, err)
	}
	return s, nil
}

// Names lists the registered type names (not aliases), sorted.
func (r *Registry) Names() []string {
	r.mu.RLock()
	defer r.mu.RUnlock()
	seen := make(map[string]bool)
	var names []string
	for _, t := range r.types {
		if !seen[t.Name] {
			seen[t.Name] = true
			names = append(names, t.Name)
		}
	}
	sort.Strings(names)
	return names
}
