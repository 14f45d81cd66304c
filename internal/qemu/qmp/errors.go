package qmp

import (
	"errors"
	"fmt"
)

// ErrClosed is the sentinel for "the monitor can no longer carry commands",
// whether QEMU exited, the socket broke, or Close was called. Callers test
// for it with errors.Is because the concrete error usually carries the
// underlying cause (io.EOF, a decode error, ...) as well.
var ErrClosed = errors.New("qmp: monitor closed")

// Error is an error reply from QEMU. It is a distinct type, rather than a
// plain string, so callers can branch on Class (for example "DeviceNotFound"
// versus "GenericError") with errors.As instead of matching text.
type Error struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

func (e *Error) Error() string {
	return fmt.Sprintf("qmp: %s: %s", e.Class, e.Desc)
}
