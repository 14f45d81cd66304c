package manager

import (
	"context"
	"errors"
	"fmt"
	"net/http"

	"github.com/vigil-project/vigil/internal/hostproto"
)

// Kinds of failure the API distinguishes. handlers map them to status codes
// in one place (statusOf); messages stay the operator-facing sentence.
var (
	ErrInvalid      = errors.New("invalid")
	ErrNotFound     = errors.New("not found")
	ErrConflict     = errors.New("conflict")
	ErrBusy         = errors.New("busy")
	ErrUnavailable  = errors.New("unavailable")
	ErrUnauthorized = errors.New("unauthorized")
	// ErrForbidden: authenticated, but the role does not allow it.
	ErrForbidden = errors.New("forbidden")
	// ErrGone: the host was declared dead; it must fence and join again.
	ErrGone = errors.New("gone")
)

// kindError carries an operator-facing message and the kind it maps from.
type kindError struct {
	kind error
	msg  string
	err  error // optional cause
	// full: msg already says everything, including the cause.
	full bool
}

func (e *kindError) Error() string {
	if e.err != nil && !e.full {
		return e.msg + ": " + e.err.Error()
	}
	return e.msg
}

func (e *kindError) Unwrap() []error {
	if e.err != nil {
		return []error{e.kind, e.err}
	}
	return []error{e.kind}
}

func errorf(kind error, format string, args ...any) error {
	return &kindError{kind: kind, msg: fmt.Sprintf(format, args...)}
}

func wrapf(kind, cause error, format string, args ...any) error {
	return &kindError{kind: kind, msg: fmt.Sprintf(format, args...), err: cause}
}

// statusOf maps an error to an HTTP status and a stable code.
func statusOf(err error) (int, string) {
	switch {
	case errors.Is(err, ErrInvalid):
		return http.StatusBadRequest, "invalid"
	case errors.Is(err, ErrNotFound):
		return http.StatusNotFound, "not_found"
	case errors.Is(err, ErrBusy):
		return http.StatusConflict, "busy"
	case errors.Is(err, ErrConflict):
		return http.StatusConflict, "conflict"
	case errors.Is(err, ErrUnauthorized):
		return http.StatusUnauthorized, "unauthorized"
	case errors.Is(err, ErrForbidden):
		return http.StatusForbidden, "forbidden"
	case errors.Is(err, ErrGone):
		return http.StatusGone, "gone"
	case errors.Is(err, ErrUnavailable):
		return http.StatusServiceUnavailable, "unavailable"
	// What a host answered keeps its meaning, in process or over the wire.
	case errors.Is(err, hostproto.ErrInvalid):
		return http.StatusBadRequest, "invalid"
	case errors.Is(err, hostproto.ErrDiskInUse), errors.Is(err, hostproto.ErrNotOwner), errors.Is(err, hostproto.ErrRunning),
		errors.Is(err, hostproto.ErrNotRunning), errors.Is(err, hostproto.ErrBadState), errors.Is(err, hostproto.ErrNoGuestAgent),
		errors.Is(err, hostproto.ErrWrongPool), errors.Is(err, hostproto.ErrUnknownVM), errors.Is(err, hostproto.ErrNoSnapshot):
		return http.StatusConflict, "conflict"
	case errors.Is(err, hostproto.ErrCutOff), errors.Is(err, hostproto.ErrUnreachable), errors.Is(err, hostproto.ErrTimeout),
		errors.Is(err, hostproto.ErrUnauthorized), errors.Is(err, context.DeadlineExceeded):
		return http.StatusServiceUnavailable, "unavailable"
	default:
		return http.StatusInternalServerError, "internal"
	}
}
