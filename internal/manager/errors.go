package manager

import (
	"errors"
	"fmt"
	"net/http"
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
	case errors.Is(err, ErrGone):
		return http.StatusGone, "gone"
	case errors.Is(err, ErrUnavailable):
		return http.StatusServiceUnavailable, "unavailable"
	default:
		return http.StatusInternalServerError, "internal"
	}
}
