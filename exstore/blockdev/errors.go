package blockdev

import "errors"

// ErrInUse reports that a device opened with Options.Exclusive is already
// locked by another open, normally another process serving it.
var ErrInUse = errors.New("device is in use by another process")

// ErrReadOnly reports a write or discard on a device opened read-only.
var ErrReadOnly = errors.New("device is opened read-only")

// ErrOutOfRange reports a write or discard that does not fit inside the
// device: a device never grows, unlike a regular file written past its end.
var ErrOutOfRange = errors.New("range beyond the end of the device")
