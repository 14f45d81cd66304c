// Package guestproto defines the wire protocol spoken between the Vigil host
// and the vigil-guest agent over a virtio-serial port.
//
// The protocol is newline-delimited JSON: every message is exactly one line.
// Each message carries a major version number; a peer rejects messages with a
// major version it does not understand, while unknown message types and
// unknown fields within a known version are tolerated so that the protocol can
// grow without a version bump.
package guestproto

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"
	"unicode/utf8"
)

// Version is the protocol major version spoken by this package.
const Version = 1

// PortName is the virtio-serial port name the agent listens on. The guest
// finds its device by this name rather than by a fixed /dev path, because
// port numbering depends on device order on the QEMU command line.
const PortName = "org.vigil.agent.0"

// MaxLineBytes is the largest accepted line, excluding the newline. It bounds
// the memory a misbehaving peer (or garbage on the channel) can make us use.
const MaxLineBytes = 64 << 10

// Message types.
const (
	TypeHeartbeat = "heartbeat"
	TypePing      = "ping"
	TypePong      = "pong"
	// TypeExec asks the guest to run a shell command; it answers with
	// TypeExecResult carrying the same ID.
	TypeExec       = "exec"
	TypeExecResult = "exec-result"
	// TypeHeartbeatNow asks the guest for a heartbeat at once (the host
	// sends it when a guest resumes: its next would come up to an interval
	// later, and the guest looks unwell meanwhile). No answer but the
	// heartbeat; an agent that does not know it ignores it.
	TypeHeartbeatNow = "heartbeat-now"
)

// MaxExecOutput bounds the output an exec result carries. JSON escaping
// can grow output up to six times (a control byte becomes \u0001), so a
// result is further cut to fit its line: see FitExecResult.
const MaxExecOutput = 16 << 10

var (
	// ErrVersion is wrapped by decode errors for messages whose major
	// version is not Version.
	ErrVersion = errors.New("unsupported protocol version")
	// ErrMalformed is wrapped by decode errors for lines that are not a
	// valid message. The decoder remains usable after such an error.
	ErrMalformed = errors.New("malformed message")
	// ErrLineTooLong is wrapped (together with ErrMalformed) when a line
	// exceeds MaxLineBytes.
	ErrLineTooLong = errors.New("line too long")
)

// Message is one protocol message.
type Message struct {
	V          int         `json:"v"`
	Type       string      `json:"type"`
	ID         string      `json:"id,omitempty"` // correlates a ping with its pong
	Heartbeat  *Heartbeat  `json:"heartbeat,omitempty"`
	Exec       *Exec       `json:"exec,omitempty"`
	ExecResult *ExecResult `json:"exec_result,omitempty"`
}

// Exec is a command for the guest's /bin/sh -c.
type Exec struct {
	Command string `json:"command"`
	// TimeoutSeconds bounds a foreground command (default 30).
	TimeoutSeconds int `json:"timeout_seconds,omitempty"`
	// Background starts the command detached and answers at once.
	Background bool `json:"background,omitempty"`
}

// ExecResult is the outcome of an Exec.
type ExecResult struct {
	ExitCode int `json:"exit_code"`
	// Output is stdout and stderr together, cut to MaxExecOutput bytes and
	// to what fits in one line (FitExecResult).
	Output    string `json:"output"`
	Truncated bool   `json:"truncated,omitempty"`
	// Error is set when the command could not be run at all (or timed out).
	Error string `json:"error,omitempty"`
}

// Heartbeat is the periodic liveness and health report sent by the guest.
type Heartbeat struct {
	BootID        string    `json:"boot_id"`        // /proc/sys/kernel/random/boot_id
	Seq           uint64    `json:"seq"`            // +1 per heartbeat since the agent started, first is 1
	UptimeSeconds float64   `json:"uptime_seconds"` // /proc/uptime
	Load1         float64   `json:"load1"`          // /proc/loadavg
	MemUsedBytes  uint64    `json:"mem_used_bytes"` // MemTotal-MemAvailable
	MemTotalBytes uint64    `json:"mem_total_bytes"`
	SentAt        time.Time `json:"sent_at"` // guest clock
}

// validate checks the invariants a receiver relies on.
func (m *Message) validate() error {
	if m.V != Version {
		return fmt.Errorf("%w: got v=%d, want %d", ErrVersion, m.V, Version)
	}
	if m.Type == "" {
		return fmt.Errorf("%w: missing type", ErrMalformed)
	}
	if m.Type == TypeHeartbeat && m.Heartbeat == nil {
		return fmt.Errorf("%w: heartbeat message without heartbeat body", ErrMalformed)
	}
	if m.Type == TypeExec && (m.Exec == nil || m.Exec.Command == "") {
		return fmt.Errorf("%w: exec message without a command", ErrMalformed)
	}
	if m.Type == TypeExecResult && m.ExecResult == nil {
		return fmt.Errorf("%w: exec-result message without a result", ErrMalformed)
	}
	return nil
}

// Encoder writes messages as JSON lines. It is safe for concurrent use.
type Encoder struct {
	mu sync.Mutex
	w  io.Writer
}

// NewEncoder returns an Encoder writing to w.
func NewEncoder(w io.Writer) *Encoder { return &Encoder{w: w} }

// Encode writes m as a single line with a single Write call, so that on a
// message-oriented transport (such as a virtio-serial port) a message is never
// interleaved with another. A zero V is filled in with Version.
func (e *Encoder) Encode(m Message) error {
	if m.V == 0 {
		m.V = Version
	}
	if err := m.validate(); err != nil {
		return fmt.Errorf("encode %s: %w", m.Type, err)
	}
	// json.Marshal escapes control characters inside strings, so the output
	// never contains a raw newline and the framing cannot be broken.
	b, err := json.Marshal(m)
	if err != nil {
		return fmt.Errorf("encode %s: %w", m.Type, err)
	}
	if len(b) > MaxLineBytes {
		return fmt.Errorf("encode %s: %w: %d bytes", m.Type, ErrLineTooLong, len(b))
	}
	b = append(b, '\n')
	e.mu.Lock()
	defer e.mu.Unlock()
	if _, err := e.w.Write(b); err != nil {
		return fmt.Errorf("write %s: %w", m.Type, err)
	}
	return nil
}

// Decoder reads JSON-line messages. It is not safe for concurrent use.
type Decoder struct {
	r *bufio.Reader
}

// NewDecoder returns a Decoder reading from r.
func NewDecoder(r io.Reader) *Decoder {
	return &Decoder{r: bufio.NewReaderSize(r, 4096)}
}

// Decode returns the next message. Blank lines are skipped. A malformed or
// over-long line yields an error wrapping ErrMalformed, and a message with an
// unknown major version one wrapping ErrVersion; in both cases the offending
// line has been consumed and the next call continues with the following line,
// because the channel may carry noise (for example from early boot). At the end
// of input Decode returns io.EOF; a final line without a newline is still
// decoded.
func (d *Decoder) Decode() (Message, error) {
	for {
		line, err := d.readLine()
		if err != nil {
			return Message{}, err
		}
		line = bytes.TrimSpace(line)
		if len(line) == 0 {
			continue
		}
		var m Message
		if err := json.Unmarshal(line, &m); err != nil {
			return Message{}, fmt.Errorf("%w: %w", ErrMalformed, err)
		}
		if err := m.validate(); err != nil {
			return Message{}, err
		}
		return m, nil
	}
}

// readLine returns the next line without its terminator. Over-long lines are
// drained to their end and reported, so the stream stays in sync.
func (d *Decoder) readLine() ([]byte, error) {
	var buf []byte
	for {
		chunk, err := d.r.ReadSlice('\n')
		if len(buf)+len(chunk) > MaxLineBytes+1 { // +1 for the newline
			if drainErr := d.drain(err); drainErr != nil && !errors.Is(drainErr, io.EOF) {
				return nil, drainErr
			}
			return nil, fmt.Errorf("%w: %w: more than %d bytes", ErrMalformed, ErrLineTooLong, MaxLineBytes)
		}
		buf = append(buf, chunk...)
		switch {
		case err == nil:
			return buf[:len(buf)-1], nil
		case errors.Is(err, bufio.ErrBufferFull):
			continue
		case errors.Is(err, io.EOF) && len(buf) > 0:
			// An unterminated final line; hand it out and report EOF on the
			// next call.
			return buf, nil
		default:
			return nil, err
		}
	}
}

// drain discards input up to and including the next newline. lastErr is the
// error from the read that detected the over-long line.
func (d *Decoder) drain(lastErr error) error {
	for {
		switch {
		case lastErr == nil:
			return nil // the chunk that overflowed ended with the newline
		case !errors.Is(lastErr, bufio.ErrBufferFull):
			return lastErr
		}
		_, lastErr = d.r.ReadSlice('\n')
	}
}

// FitExecResult cuts r's output so that the exec-result message answering
// id encodes to at most MaxLineBytes, whatever bytes the command printed,
// and marks it Truncated if anything was cut. A line over the limit would
// be refused by Encode (and by the peer's Decoder), leaving the caller
// without an answer.
func FitExecResult(id string, r ExecResult) ExecResult {
	if len(r.Output) > MaxExecOutput {
		r.Output, r.Truncated = cutValid(r.Output, MaxExecOutput), true
	}
	env := r
	env.Output, env.Truncated = "", true // the envelope as it is once cut
	b, err := json.Marshal(Message{V: Version, Type: TypeExecResult, ID: id, ExecResult: &env})
	if err != nil {
		return r
	}
	budget := MaxLineBytes - len(b)
	if n := jsonLen(r.Output); n <= budget {
		return r
	}
	r.Output, r.Truncated = cutJSON(r.Output, max(budget, 0)), true
	return r
}

// jsonLen is the length of s inside a JSON string as encoding/json writes
// it (HTML-safe escaping on), or more: it may overestimate, never under.
func jsonLen(s string) int {
	n := 0
	for i := 0; i < len(s); {
		w, size := runeJSONLen(s[i:])
		n += w
		i += size
	}
	return n
}

// cutJSON returns the longest prefix of s, ending on a character
// boundary, whose JSON encoding takes at most budget bytes.
func cutJSON(s string, budget int) string {
	n := 0
	for i := 0; i < len(s); {
		w, size := runeJSONLen(s[i:])
		if n+w > budget {
			return s[:i]
		}
		n += w
		i += size
	}
	return s
}

// cutValid cuts s to at most n bytes without splitting a UTF-8 sequence.
func cutValid(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for i := n; i > n-utf8.UTFMax && i > 0; i-- {
		if utf8.RuneStart(s[i]) {
			return s[:i]
		}
	}
	return s[:n]
}

// runeJSONLen is the encoded length of the first character of s (a byte
// of invalid UTF-8 counts as one character) and its length in s.
func runeJSONLen(s string) (encoded, size int) {
	if c := s[0]; c < utf8.RuneSelf {
		switch {
		case c == '"' || c == '\\' || c == '\n' || c == '\r' || c == '\t':
			return 2, 1
		case c < 0x20 || c == '<' || c == '>' || c == '&':
			return 6, 1 // \u00XX
		default:
			return 1, 1
		}
	}
	r, size := utf8.DecodeRuneInString(s)
	if r == utf8.RuneError && size == 1 || r == '\u2028' || r == '\u2029' {
		return 6, size // \ufffd, \u2028, \u2029
	}
	return size, size
}
