package qga

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// sentinel is the byte the agent puts before its answer to
// guest-sync-delimited, and the byte a client sends to make the agent's
// JSON parser drop whatever half-read text an earlier client left behind.
// 0xFF can never occur in UTF-8 JSON text, so it cannot be confused with data.
const sentinel = 0xFF

// Bounds on single answer lines. The agent answers with one JSON object per
// line, and base64 payloads make some lines large, but a guest can also
// send a line that never ends; without a bound a hostile or broken guest
// could make the host allocate without limit.
const (
	// maxAnswer bounds ordinary answers. Our own guest-file-read requests
	// ask for at most readChunk bytes, so their answers stay far below it.
	maxAnswer = 16 << 20
	// maxExecAnswer bounds guest-exec-status answers, which carry all of a
	// finished process's output at once. qemu-ga stops capturing at 16 MiB
	// per stream (GUEST_EXEC_MAX_OUTPUT), so two full streams in base64
	// come to about 44.8 MB plus a few fields.
	maxExecAnswer = 48 << 20
	// maxSyncLine bounds a line following a sentinel while synchronising.
	// Sync answers are a few dozen bytes; anything longer is stale data or
	// garbage and is skipped, not fatal.
	maxSyncLine = 1 << 10
)

// errLineTooLong is wrapped in ErrProtocol by readLine's callers' errors.
var errLineTooLong = fmt.Errorf("%w: answer line too long", ErrProtocol)

type request struct {
	Execute   string `json:"execute"`
	Arguments any    `json:"arguments,omitempty"`
}

// encodeRequest renders one command as the agent expects it: a single JSON
// object on one line. The agent has no request ids; answers pair with
// requests only by order, which is why Client allows one request at a time.
func encodeRequest(cmd string, args any) ([]byte, error) {
	b, err := json.Marshal(request{Execute: cmd, Arguments: args})
	if err != nil {
		return nil, fmt.Errorf("encode arguments: %w", err)
	}
	return append(b, '\n'), nil
}

// answer is the union of the two answer shapes. Return stays raw so that
// decoding it into the caller's type is a separate, second step.
type answer struct {
	Return json.RawMessage `json:"return"`
	Error  *Error          `json:"error"`
}

// decodeAnswer classifies one line from the agent. It returns the raw
// "return" value, or an *Error for an error answer, or an error wrapping
// ErrProtocol for anything else. Every input yields exactly one of a
// non-nil value or a non-nil error; the guest controls these bytes, so this
// function is fuzzed.
func decodeAnswer(line []byte) (json.RawMessage, error) {
	line = bytes.TrimRight(line, "\r\n")
	var a answer
	if err := json.Unmarshal(line, &a); err != nil {
		return nil, protocolError("answer is not a JSON object (%v): %s", err, excerpt(line))
	}
	switch {
	case a.Error != nil && a.Return != nil:
		return nil, protocolError("answer has both return and error: %s", excerpt(line))
	case a.Error != nil:
		return nil, a.Error
	case a.Return == nil || string(a.Return) == "null":
		// QAPI commands never return null, so a null is as wrong as a
		// missing member.
		return nil, protocolError("answer has neither return nor error: %s", excerpt(line))
	}
	return a.Return, nil
}

// excerpt shortens guest-controlled text before it goes into an error
// message, so a 16 MiB garbage line cannot end up in a log.
func excerpt(b []byte) string {
	const n = 120
	if len(b) > n {
		return fmt.Sprintf("%q...", b[:n])
	}
	return fmt.Sprintf("%q", b)
}

// readLine reads up to and including the next '\n', refusing lines longer
// than limit bytes. After errLineTooLong the reader is left in the middle
// of the line; callers either drop the connection or resynchronise.
func readLine(r *bufio.Reader, limit int) ([]byte, error) {
	var line []byte
	for {
		frag, err := r.ReadSlice('\n')
		if len(line)+len(frag) > limit {
			return nil, errLineTooLong
		}
		line = append(line, frag...)
		switch {
		case err == nil:
			return line, nil
		case errors.Is(err, bufio.ErrBufferFull):
			continue
		case errors.Is(err, io.EOF) && len(line) > 0:
			return nil, io.ErrUnexpectedEOF
		default:
			return nil, err
		}
	}
}

// skipToSentinel discards input up to and including the next sentinel byte.
// It reads in buffer-sized pieces so discarded data costs no memory; only
// the call's deadline bounds how much a babbling guest can make it read.
func skipToSentinel(r *bufio.Reader) error {
	for {
		_, err := r.ReadSlice(sentinel)
		if err == nil {
			return nil
		}
		if !errors.Is(err, bufio.ErrBufferFull) {
			return err
		}
	}
}
