package hostproto

import (
	"context"
	"errors"
	"net/http"
)

// Errors a host operation can fail with. A host agent wraps one of them into
// its message; the kind crosses the wire (see Kind), so the manager can act
// on errors.Is the same way whether the host runs in its process or on
// another machine.
var (
	// ErrInvalid: the request itself is wrong (a missing spec, an unknown
	// fault kind, a name that is not a DNS label).
	ErrInvalid = errors.New("invalid request")
	// ErrUnknownVM: the host has no VM of that name.
	ErrUnknownVM = errors.New("vm is not on this host")
	// ErrNotRunning: the operation needs a running QEMU and there is none.
	ErrNotRunning = errors.New("vm is not running")
	// ErrRunning: the operation needs the VM stopped.
	ErrRunning = errors.New("vm is already running")
	// ErrNotOwner: the pool's owner file names another host or a later
	// epoch: the VM belongs elsewhere now.
	ErrNotOwner = errors.New("this host does not own the vm")
	// ErrDiskInUse: a QEMU somewhere still has the disk open.
	ErrDiskInUse = errors.New("the vm's disk is in use by another qemu")
	// ErrWrongPool: the VM's files are in a pool this host does not mount.
	ErrWrongPool = errors.New("the vm's storage pool is not mounted on this host")
	// ErrBadState means a state file cannot be resumed (corrupt, truncated,
	// or made for other hardware). The file is left where it is.
	ErrBadState = errors.New("saved state cannot be resumed")
	// ErrNoGuestAgent: the guest agent is not connected (still booting,
	// stopped, or the guest is hung).
	ErrNoGuestAgent = errors.New("the guest agent is not connected")
	// ErrNoSnapshot: the host has no such snapshot for the VM.
	ErrNoSnapshot = errors.New("no such snapshot")
	// ErrCutOff: the host lost every manager and fenced itself; it starts
	// no pooled VM until a manager hears from it again.
	ErrCutOff = errors.New("the host is cut off from the managers")
	// ErrUnreachable: the host did not answer (the transport failed).
	ErrUnreachable = errors.New("the host does not answer")
	// ErrUnauthorized: the host refused the caller's credentials.
	ErrUnauthorized = errors.New("the host refused the caller")
	// ErrTimeout: the operation ran out of time on the host.
	ErrTimeout = errors.New("the host operation timed out")
)

// kinds pairs every error with its name on the wire and its HTTP status.
// One table: the server encodes with it, the client decodes with it.
var kinds = []struct {
	name   string
	err    error
	status int
}{
	{"invalid", ErrInvalid, http.StatusBadRequest},
	{"unknown-vm", ErrUnknownVM, http.StatusNotFound},
	{"not-running", ErrNotRunning, http.StatusConflict},
	{"running", ErrRunning, http.StatusConflict},
	{"not-owner", ErrNotOwner, http.StatusConflict},
	{"disk-in-use", ErrDiskInUse, http.StatusConflict},
	{"wrong-pool", ErrWrongPool, http.StatusConflict},
	{"bad-state", ErrBadState, http.StatusConflict},
	{"no-guest-agent", ErrNoGuestAgent, http.StatusConflict},
	{"no-snapshot", ErrNoSnapshot, http.StatusNotFound},
	{"cut-off", ErrCutOff, http.StatusServiceUnavailable},
	{"unreachable", ErrUnreachable, http.StatusBadGateway},
	{"unauthorized", ErrUnauthorized, http.StatusUnauthorized},
	{"timeout", ErrTimeout, http.StatusGatewayTimeout},
}

// KindOf names the kind of err ("internal" when it has none).
func KindOf(err error) string {
	for _, k := range kinds {
		if errors.Is(err, k.err) {
			return k.name
		}
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return "timeout"
	}
	return "internal"
}

func statusOfKind(kind string) int {
	for _, k := range kinds {
		if k.name == kind {
			return k.status
		}
	}
	return http.StatusInternalServerError
}

// remoteError is an error a host sent: its message, and its kind as a
// sentinel for errors.Is.
type remoteError struct {
	msg  string
	kind error // nil for "internal"
}

func (e *remoteError) Error() string { return e.msg }
func (e *remoteError) Unwrap() error { return e.kind }

// errorOfKind rebuilds what a host sent as an error of the same kind.
func errorOfKind(kind, msg string) error {
	for _, k := range kinds {
		if k.name == kind {
			return &remoteError{msg: msg, kind: k.err}
		}
	}
	return &remoteError{msg: msg}
}
