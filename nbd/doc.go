// Package nbd is the Network Block Device server that exports origins and
// snapshots, and the client side that snapd attach needs: Negotiate picks an
// export over a connection (fixed newstyle, NBD_OPT_GO), and on Linux
// KernelDevice hands the negotiated socket to the kernel's nbd driver with
// its ioctls, as nbd-client does. Server and client share one set of wire
// constants (protocol.go).
//
// # Negotiation
//
// The server speaks fixed newstyle only: NBD_OPT_EXPORT_NAME, INFO and GO,
// LIST, STARTTLS (refused, allowed or required by Options.TLSMode; after it
// everything agreed before is forgotten), structured replies, and the
// metadata contexts base:allocation, MetaContextExceptions (on exports whose
// Backend is a COWMapper) and one DirtyBitmapNamespace context per bitmap
// (on exports whose Backend is a DirtyBitmapper). A client that does not
// pick an export within Options.HandshakeTimeout, or sends more options or
// longer ones than the negotiation bounds allow, is closed on.
//
// LIST_META_CONTEXT lists every context of the export without a query, and
// those of a namespace for a bare "base:", "clustersnap:", "qemu:" or
// "qemu:dirty-bitmap:"; SET_META_CONTEXT selects exactly the contexts it
// names, replacing the selection, and gives each dirty bitmap an id never
// given before on the connection. A selection holds only for the export it
// was made for: selecting another export, or a new export of the same name,
// starts with none.
//
// # Dirty bitmaps
//
// A DirtyBitmapNamespace context is changed-block tracking as qemu offers
// it, so that backup tools read it unchanged (nbdinfo --map, qemu's
// x-dirty-bitmap): block status flag bit 0 (DirtyExtentDirty) marks the
// ranges that may have changed since the bitmap's point in time; a clear bit
// promises no change. The set of bitmaps is the backend's and may change
// while serving: it is read at every LIST and SET. A block status request
// for a bitmap that is gone, or that cannot be trusted, is answered with an
// error (EIO), never with a map.
//
// # Transmission
//
// Each connection has one reader goroutine and Options.MaxInFlight workers.
// The reader reads and checks requests in order and hands them to the
// workers; replies go out in the order requests finish, not the order they
// came in, each carrying its request's cookie. A READ, or a WRITE without
// FUA, may be run by the reader itself while requests of its kind have
// recently been quick; such a request still completes before the reader
// reads on. The reader stops reading while MaxInFlight requests are running
// or their payloads hold Options.MaxInFlightBytes. Requests are checked
// before they run: unknown commands or flags, commands the negotiation did
// not enable, ranges outside the export, payloads over Options.MaxPayload
// and ranges misaligned for a BlockSizer are answered with EINVAL (ENOSPC
// for writes past the end), writes to a read-only export with EPERM, and
// none of them reach the Backend. A request
// header with a bad magic closes the connection.
//
// # Backend capabilities
//
// Backend is the whole of what an export needs; the rest is optional, each
// with a safe fallback: without a Trimmer, TRIM is not advertised and
// succeeds doing nothing;
// without a Zeroer, WRITE_ZEROES writes zero-filled buffers through WriteAt
// (and a fast-zero request gets ENOTSUP); without an Extenter, every range is
// reported allocated data; without a COWMapper, MetaContextExceptions is not
// offered; without a DirtyBitmapper, no dirty bitmap is; without a
// BlockSizer, any alignment is accepted. Backend methods
// are called concurrently, from the requests of one connection and from
// different connections.
//
// # Flush and shutdown
//
// A FLUSH is answered once every write answered before it was sent is
// durable (Backend.Flush). A connection that ends without being closed hard,
// having written since its last FLUSH, flushes its export before it closes.
//
// Server.Shutdown closes the listeners and stops every connection reading
// new requests: a request whose header had arrived is run, one whose header
// was still arriving is read whole and answered with ESHUTDOWN. The requests
// in flight finish and are answered, written exports are flushed, and the
// connections close; a connection still negotiating is closed at once.
// Cancelling a Serve or ServeConn context, or Shutdown's context ending
// first, closes connections hard and cancels their requests' contexts.
//
// Exports can be added (Server.AddExport) and removed
// (Server.RemoveExport) while the server serves. A removed export is no
// longer listed or selectable; the connections using it stop as they do
// on Shutdown, and RemoveExport returns only once they have closed, so the
// caller may close the export's backend then.
//
// # Counters
//
// Server.Stats reports, per export served, its connections (open now, and
// in total) and the requests answered: successful ones by command, with
// the bytes of READs and WRITEs, and failed ones together as errors. A
// request is counted before its reply is sent. Each connection counts in
// its own atomics, which its export's totals take over when it ends, so
// connections do not contend for a shared counter on the request path. An
// export's counters start at zero when it is added and go with it when it
// is removed.
//
// # Systems
//
// The server runs wherever Go's net package does. On Linux a plain TCP
// connection is also tuned: large replies are sent with MSG_MORE and large
// WRITE payloads read with a receive low-water mark; other systems, TLS
// connections and sockets that refuse the options go without. Socket
// activation and ServeStdio over pipes need a Unix system.
//
// # Wiring a daemon
//
//	mode, err := nbd.ParseTLSMode(tlsFlag)          // "off", "allow", "require"
//	cfg, err := nbd.TLSConfigFromDir(certDir, verify) // only when mode != TLSOff
//	srv := nbd.NewServer(exports, nbd.Options{TLSMode: mode, TLS: cfg})
//
//	// Socket activation (systemd, or nbdinfo/nbdcopy "-- [ snapd ... ]"):
//	listeners, err := nbd.ListenersFromEnv() // nil when not activated
//	if listeners == nil {
//		l, err := net.Listen("tcp", addr)
//		listeners = append(listeners, l)
//	}
//	for _, l := range listeners {
//		go srv.Serve(ctx, l)
//	}
//	// Or one client on stdin/stdout (inetd, libnbd connect_command);
//	// the log must then go to stderr:
//	err = srv.ServeStdio(ctx, os.Stdin, os.Stdout)
//
//	err = srv.Shutdown(ctx)
//
// Clients that start a private server (nbdinfo and nbdcopy "-- [ CMD ]", and
// libnbd's connect_command) ask for the default export, named "".
package nbd
