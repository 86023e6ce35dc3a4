package exstore

// extent is a run of exceptions: origin chunks old..old+n-1 map to COW
// chunks new..new+n-1.
type extent struct {
	old, new Chunk
	n        uint64
}

// last is the extent's last origin chunk.
func (x *extent) last() Chunk { return x.old + Chunk(x.n) - 1 }

const (
	// extentNodeMax is the most extents in a leaf and children in an
	// inner node: a leaf's extents take 32×24 bytes.
	extentNodeMax = 32
	// extentNodeMin is the fewest a node other than the root keeps; below
	// it, a node borrows from or merges with a sibling. A quarter (not
	// half) of the maximum makes insert/remove churn at a node boundary
	// cheap while still bounding memory to a few bytes per exception.
	extentNodeMin = extentNodeMax / 4
)

// extentTree is a B+ tree of disjoint extents ordered by old: the ordered
// index of the Table's long runs. Every operation is O(log n).
//
// An inner node with k children has k-1 separators; keys[i] separates
// kids[i] and kids[i+1]: every extent under kids[i] starts before keys[i],
// and every extent under kids[i+1] starts at or after it. Separators need not
// be the exact first key of their right subtree (removals leave them loose),
// so searches that come back empty from kids[i] fall back to kids[i-1].
type extentTree struct {
	root  *extentNode
	count int // extents
}

// extentNode is a leaf (kids == nil, extents in items) or an inner node.
type extentNode struct {
	keys  []Chunk
	kids  []*extentNode
	items []extent
}

func (n *extentNode) leaf() bool { return n.kids == nil }

// size is the number of extents (leaf) or children (inner node).
func (n *extentNode) size() int {
	if n.leaf() {
		return len(n.items)
	}
	return len(n.kids)
}

// child is the index of the child whose range holds c.
func (n *extentNode) child(c Chunk) int {
	lo, hi := 0, len(n.keys)
	for lo < hi {
		m := int(uint(lo+hi) >> 1)
		if n.keys[m] <= c {
			lo = m + 1
		} else {
			hi = m
		}
	}
	return lo
}

// after is the index of the first extent of the leaf n starting after c.
func (n *extentNode) after(c Chunk) int {
	lo, hi := 0, len(n.items)
	for lo < hi {
		m := int(uint(lo+hi) >> 1)
		if n.items[m].old <= c {
			lo = m + 1
		} else {
			hi = m
		}
	}
	return lo
}

// floor returns the extent with the greatest old ≤ c, or nil. The pointer is
// valid until the tree changes shape (insert or remove).
func (t *extentTree) floor(c Chunk) *extent {
	if t.count == 0 {
		return nil
	}
	return t.root.floor(c)
}

func (n *extentNode) floor(c Chunk) *extent {
	if n.leaf() {
		if i := n.after(c); i > 0 {
			return &n.items[i-1]
		}
		return nil
	}
	i := n.child(c)
	if x := n.kids[i].floor(c); x != nil {
		return x
	}
	if i > 0 {
		return n.kids[i-1].lastExtent()
	}
	return nil
}

// ceil returns the extent with the least old ≥ c, or nil.
func (t *extentTree) ceil(c Chunk) *extent {
	if t.count == 0 {
		return nil
	}
	return t.root.ceil(c)
}

func (n *extentNode) ceil(c Chunk) *extent {
	if n.leaf() {
		i := n.after(c)
		if i > 0 && n.items[i-1].old == c {
			return &n.items[i-1]
		}
		if i < len(n.items) {
			return &n.items[i]
		}
		return nil
	}
	i := n.child(c)
	if x := n.kids[i].ceil(c); x != nil {
		return x
	}
	if i+1 < len(n.kids) {
		return n.kids[i+1].firstExtent()
	}
	return nil
}

// lastExtent is the last extent under n (nil only for an empty leaf root).
func (n *extentNode) lastExtent() *extent {
	for !n.leaf() {
		n = n.kids[len(n.kids)-1]
	}
	if len(n.items) == 0 {
		return nil
	}
	return &n.items[len(n.items)-1]
}

// firstExtent is the first extent under n (nil only for an empty leaf root).
func (n *extentNode) firstExtent() *extent {
	for !n.leaf() {
		n = n.kids[0]
	}
	if len(n.items) == 0 {
		return nil
	}
	return &n.items[0]
}

// find returns the extent that holds c, or nil.
func (t *extentTree) find(c Chunk) *extent {
	if x := t.floor(c); x != nil && c-x.old < Chunk(x.n) {
		return x
	}
	return nil
}

// insert adds x, which must not overlap any extent of t.
func (t *extentTree) insert(x extent) {
	if t.root == nil {
		t.root = &extentNode{items: make([]extent, 0, extentNodeMax+1)}
	}
	if right, sep := t.root.insert(x); right != nil {
		t.root = &extentNode{
			keys: append(make([]Chunk, 0, extentNodeMax), sep),
			kids: append(make([]*extentNode, 0, extentNodeMax+1), t.root, right),
		}
	}
	t.count++
}

// insert adds x under n. If n overflows it splits, returning its new right
// sibling and the separator between them.
func (n *extentNode) insert(x extent) (*extentNode, Chunk) {
	if n.leaf() {
		i := n.after(x.old)
		n.items = append(n.items, extent{})
		copy(n.items[i+1:], n.items[i:])
		n.items[i] = x
		if len(n.items) <= extentNodeMax {
			return nil, 0
		}
		half := len(n.items) / 2
		right := &extentNode{items: append(make([]extent, 0, extentNodeMax+1), n.items[half:]...)}
		clear(n.items[half:])
		n.items = n.items[:half]
		return right, right.items[0].old
	}
	i := n.child(x.old)
	right, sep := n.kids[i].insert(x)
	if right == nil {
		return nil, 0
	}
	n.keys = append(n.keys, 0)
	copy(n.keys[i+1:], n.keys[i:])
	n.keys[i] = sep
	n.kids = append(n.kids, nil)
	copy(n.kids[i+2:], n.kids[i+1:])
	n.kids[i+1] = right
	if len(n.kids) <= extentNodeMax {
		return nil, 0
	}
	// Split: the left half keeps kids[:half] and keys[:half-1]; keys[half-1]
	// moves up.
	half := len(n.kids) / 2
	up := n.keys[half-1]
	right = &extentNode{
		keys: append(make([]Chunk, 0, extentNodeMax), n.keys[half:]...),
		kids: append(make([]*extentNode, 0, extentNodeMax+1), n.kids[half:]...),
	}
	clear(n.kids[half:])
	n.kids = n.kids[:half]
	n.keys = n.keys[:half-1]
	return right, up
}

// moveStart extends the extent starting at old backwards by d chunks (d ≤
// old), in place: a run growing at its front does not churn the tree. The
// caller guarantees old-d is after the previous extent's last chunk.
func (t *extentTree) moveStart(old Chunk, d uint64) {
	// The extent's leaf covers origin chunks from the deepest separator on
	// the way down that is to its left; if it is the leaf's first extent,
	// that separator may have to come down with it. Every extent to the
	// left of the separator ends before old-d, so lowering it is sound.
	var sep *Chunk
	n := t.root
	for !n.leaf() {
		i := n.child(old)
		if i > 0 {
			sep = &n.keys[i-1]
		}
		n = n.kids[i]
	}
	i := n.after(old) - 1
	x := &n.items[i]
	x.old -= Chunk(d)
	x.new -= Chunk(d)
	x.n += d
	if sep != nil && *sep > x.old {
		*sep = x.old
	}
}

// remove deletes the extent starting at old, reporting whether there was one.
func (t *extentTree) remove(old Chunk) bool {
	if t.count == 0 || !t.root.remove(old) {
		return false
	}
	t.count--
	if !t.root.leaf() && len(t.root.kids) == 1 {
		t.root = t.root.kids[0]
	}
	return true
}

func (n *extentNode) remove(old Chunk) bool {
	if n.leaf() {
		i := n.after(old)
		if i == 0 || n.items[i-1].old != old {
			return false
		}
		n.items = append(n.items[:i-1], n.items[i:]...)
		n.items[len(n.items):cap(n.items)][0] = extent{}
		return true
	}
	i := n.child(old)
	if !n.kids[i].remove(old) {
		return false
	}
	if n.kids[i].size() < extentNodeMin {
		n.rebalance(i)
	}
	return true
}

// rebalance refills kids[i], which fell below extentNodeMin, from a sibling,
// or merges it with one.
func (n *extentNode) rebalance(i int) {
	switch {
	case i > 0 && n.kids[i-1].size() > extentNodeMin:
		n.borrowFromLeft(i)
	case i+1 < len(n.kids) && n.kids[i+1].size() > extentNodeMin:
		n.borrowFromLeft(i + 1) // kids[i] borrows from its right: same rotation
	case i > 0:
		n.merge(i - 1)
	default:
		n.merge(i)
	}
}

// borrowFromLeft moves one entry between kids[i-1] and kids[i] towards the
// smaller one, rotating the separator keys[i-1] through n.
func (n *extentNode) borrowFromLeft(i int) {
	l, r := n.kids[i-1], n.kids[i]
	if l.size() > r.size() { // left → right
		if l.leaf() {
			x := l.items[len(l.items)-1]
			l.items[len(l.items)-1] = extent{}
			l.items = l.items[:len(l.items)-1]
			r.items = append(r.items, extent{})
			copy(r.items[1:], r.items)
			r.items[0] = x
			n.keys[i-1] = x.old
			return
		}
		k := l.kids[len(l.kids)-1]
		l.kids[len(l.kids)-1] = nil
		l.kids = l.kids[:len(l.kids)-1]
		r.kids = append(r.kids, nil)
		copy(r.kids[1:], r.kids)
		r.kids[0] = k
		r.keys = append(r.keys, 0)
		copy(r.keys[1:], r.keys)
		r.keys[0] = n.keys[i-1]
		n.keys[i-1] = l.keys[len(l.keys)-1]
		l.keys = l.keys[:len(l.keys)-1]
		return
	}
	// right → left
	if r.leaf() {
		l.items = append(l.items, r.items[0])
		r.items = append(r.items[:0], r.items[1:]...)
		r.items[len(r.items):cap(r.items)][0] = extent{}
		n.keys[i-1] = r.items[0].old
		return
	}
	l.kids = append(l.kids, r.kids[0])
	l.keys = append(l.keys, n.keys[i-1])
	n.keys[i-1] = r.keys[0]
	r.kids = append(r.kids[:0], r.kids[1:]...)
	r.kids[len(r.kids):cap(r.kids)][0] = nil
	r.keys = append(r.keys[:0], r.keys[1:]...)
}

// merge joins kids[i+1] into kids[i], dropping the separator keys[i].
func (n *extentNode) merge(i int) {
	l, r := n.kids[i], n.kids[i+1]
	if l.leaf() {
		l.items = append(l.items, r.items...)
	} else {
		l.keys = append(l.keys, n.keys[i])
		l.keys = append(l.keys, r.keys...)
		l.kids = append(l.kids, r.kids...)
	}
	n.keys = append(n.keys[:i], n.keys[i+1:]...)
	n.kids = append(n.kids[:i+1], n.kids[i+2:]...)
	n.kids[len(n.kids):cap(n.kids)][0] = nil
}

// each calls fn for every extent in order until fn returns false.
func (t *extentTree) each(fn func(x *extent) bool) bool {
	if t.count == 0 {
		return true
	}
	return t.root.each(fn)
}

func (n *extentNode) each(fn func(x *extent) bool) bool {
	if n.leaf() {
		for i := range n.items {
			if !fn(&n.items[i]) {
				return false
			}
		}
		return true
	}
	for _, k := range n.kids {
		if !k.each(fn) {
			return false
		}
	}
	return true
}
