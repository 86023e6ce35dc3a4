package dlm

// SetABI makes e's lockspaces behave as on a kernel reporting device ABI
// v, for tests of version-specific paths.
func SetABI(e *Engine, v [3]uint32) {
	x := version(v)
	e.abi = &x
}
