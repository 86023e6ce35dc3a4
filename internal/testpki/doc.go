// Package testpki is a throwaway certificate authority for tests. New makes
// a CA, a server certificate it signed for localhost, 127.0.0.1 and ::1, and
// a client certificate, and writes them as PEM files in the directory
// layouts that qemu's tls-creds-x509, nbdkit, libnbd and snapd's --tls-dir
// read; the single files are what etcd's TLS options take.
//
// Each PKI is its own CA: a certificate of one does not verify against
// another, which is how tests make a stranger. Keys are ECDSA P-256, valid
// from an hour before New for a day, and live in the test's temporary
// directories. Only tests import this package.
package testpki
