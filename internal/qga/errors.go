package qga

import (
	"errors"
	"fmt"
)

// ErrNoAnswer means the guest agent stayed silent until the call's deadline.
// That is what a hung guest, a guest without a running agent, or a paused VM
// looks like from the host, so health checks branch on it with errors.Is.
// Errors wrapping it also wrap context.DeadlineExceeded.
var ErrNoAnswer = errors.New("guest agent did not answer")

// ErrProtocol means the guest sent something that is not a valid answer:
// a line that is not JSON, an answer of the wrong shape, bad base64, a line
// over the size bound. The guest is not trusted, so this is an ordinary,
// expected error, never a panic.
var ErrProtocol = errors.New("guest agent protocol error")

// ErrClosed is returned by calls on a Client after Close.
var ErrClosed = errors.New("guest agent client closed")

// Error is an error answer from the agent itself ({"error":{...}}). It is a
// type, not a string, so callers can branch on Class (for example
// "CommandNotFound" for a command the agent lacks or has disabled) with
// errors.As.
type Error struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

func (e *Error) Error() string {
	return fmt.Sprintf("%s: %s", e.Class, e.Desc)
}

// protocolError wraps ErrProtocol with a description of what was wrong.
func protocolError(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrProtocol, fmt.Sprintf(format, args...))
}
