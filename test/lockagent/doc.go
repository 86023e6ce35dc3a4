// Package lockagent carries lockc engines over a stream, so that a test on
// the host drives lock engines that live elsewhere: in QEMU guests whose
// kernels have the DLM, one connection per guest.
//
// A server (Serve) wraps the engines of any number of node ids (a guest may
// run several, each its own set of lockspace file descriptors) and answers
// one client. The client (NewClient) implements lockc.Engine, Lockspace and
// Lock faithfully: every call is a request with an id, answered by a reply
// with the same id; a call whose context ends sends a cancel for that id and
// then waits for the reply, so the remote engine decides (as lockc
// promises) whether the cancel or the grant won. Errors come back with the
// lockc sentinel (or context error) they wrapped, so errors.Is works.
// Blocking notifications and lockspace losses are pushed by the server.
// Locks offer lockc.Tokener exactly when the server's do.
//
// Ordering. Frames travel in order on the stream. SetLVB and InvalidateLVB
// are synchronous round trips handled in the server's read loop, so they
// take effect before any later call of the client. Before replying to
// WaitQueueLen the server sends every blocking notification its engines
// delivered, so the client has them when WaitQueueLen returns.
//
// Loss. A lockspace is lost on the client when the server pushes its loss,
// when it is closed, when the connection ends (pending calls fail with
// lockc.ErrLost and ErrDisconnected), and when the client crashes its node
// (Crash, LoseNode): the client loses the node's lockspaces (OnLost
// functions, then IsLost, then Lost) before it asks the server, so the loss
// is known on the host before the lock manager can grant another node what
// the crashed node held. A grant that races that loss is reported as
// lockc.ErrLost.
//
// Test operations beyond lockc: Crash (the server's engine dies like a
// crashed process, without releasing its locks), WaitQueueLen and
// ResourceCount, each offered when the server's configuration has it
// (Client.CanWaitQueueLen, CanCountResources).
package lockagent
