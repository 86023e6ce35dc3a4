// Package control is snapd's management protocol: requests to a running
// server over a unix socket, and the client that sends them.
//
// Transport. A stream unix socket that only its owner may use: Listen
// creates it with mode 0600 (refusing to replace a socket some server still
// answers on), and the server also checks each connection's peer
// credentials, so a connection made in the moment between bind and chmod,
// or through a directory with looser rights, is refused unless it comes
// from the server's own user or root.
//
// Protocol, version 1. Each message is one line of JSON (at most
// MaxMessage bytes). A request is {"version":1,"op":NAME,"args":{...}};
// the reply is {"version":1,"ok":true,"result":{...}} or
// {"version":1,"ok":false,"code":CODE,"error":TEXT}, with CODE one of the
// Code constants. A connection carries any number of request and reply
// pairs in turn. A request of another version, an unknown op, malformed
// JSON or bad arguments get an error reply and change nothing; a line too
// long, or anything unreadable, closes the connection. Ops are added, never
// changed: a change of meaning is a new version.
//
// Ops (ops.go), each with its arguments and result types: "status" (the
// server's volumes.Status), "snapshot-list", "snapshot-create" (formats a
// COW and adds a snapshot to the serving origin), "snapshot-delete", and
// "snapshot-merge" (starts a merge that runs on in the server, whatever
// becomes of the client; "status" reports its progress and end).
// Arguments with unknown fields are refused, so that a misspelt option is
// never ignored. Besides bad-request, the snapshot ops answer "not-found"
// and "exists" for a name that is not, or already, served.
//
// Handlers run one at a time per connection, concurrently across
// connections; a handler must be safe for that. A handler's context ends
// when the server stops or the client hangs up.
package control
