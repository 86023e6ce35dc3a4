package etcd

import "go.uber.org/zap"

// quietLogger keeps etcd's client from logging its retries to stderr:
// failures reach callers as errors, which say which lock they concern.
func quietLogger() *zap.Logger { return zap.NewNop() }
