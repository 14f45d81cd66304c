// Package qmp is a small client for the QEMU Machine Protocol.
//
// One Monitor owns one QMP connection. A single reader goroutine owns the
// read side of the socket so that asynchronous events, which QEMU may emit
// at any moment (even between a command and its reply), never get confused
// with command replies: replies are matched to callers by a per-command id,
// and events are fanned out to subscribers. Writes are serialized so that
// any number of goroutines may call Run concurrently.
//
// Malformed input policy: a byte stream that is not valid JSON ends the
// monitor (Err reports the decode error), because once the JSON framing is
// lost there is no reliable way to find the next message and a silently
// resynchronized stream could pair replies with the wrong commands. A
// message that is valid JSON but has an unexpected shape is not fatal: if
// it still carries a known id, that command fails with a descriptive error;
// otherwise the message is dropped.
package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// Version is the QEMU version reported in the QMP greeting and by
// query-version.
type Version struct {
	Major   int
	Minor   int
	Micro   int
	Package string
}

func (v Version) String() string {
	s := fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Micro)
	if v.Package != "" {
		s += " (" + v.Package + ")"
	}
	return s
}

// versionInfo mirrors QEMU's VersionInfo, which is nested differently from
// the flat Version exposed to callers.
type versionInfo struct {
	QEMU struct {
		Major int `json:"major"`
		Minor int `json:"minor"`
		Micro int `json:"micro"`
	} `json:"qemu"`
	Package string `json:"package"`
}

func (v versionInfo) version() Version {
	return Version{Major: v.QEMU.Major, Minor: v.QEMU.Minor, Micro: v.QEMU.Micro, Package: v.Package}
}

// Event is an asynchronous QMP event. Data is left raw because its shape
// depends on Name and most consumers only care about a few event types.
type Event struct {
	Name string
	Data json.RawMessage
	Time time.Time
}

// message is the union of everything QEMU may send, so that one decode
// step can classify a line as greeting, reply or event.
type message struct {
	QMP *struct {
		Version      versionInfo `json:"version"`
		Capabilities []string    `json:"capabilities"`
	} `json:"QMP"`
	Return    json.RawMessage `json:"return"`
	Error     *Error          `json:"error"`
	Event     string          `json:"event"`
	Data      json.RawMessage `json:"data"`
	Timestamp *struct {
		Seconds      int64 `json:"seconds"`
		Microseconds int64 `json:"microseconds"`
	} `json:"timestamp"`
	ID json.RawMessage `json:"id"`
}

type request struct {
	Execute   string `json:"execute"`
	Arguments any    `json:"arguments,omitempty"`
	ID        string `json:"id"`
}

// reply is what the reader hands to a waiting Run call. err is set for QMP
// error replies and for replies the reader could not make sense of.
type reply struct {
	ret json.RawMessage
	err error
}

// Monitor is a QMP connection. It holds no global state; all methods are
// safe for concurrent use.
type Monitor struct {
	conn    net.Conn
	version Version

	nextID atomic.Uint64
	// wsem serializes writes; it is a channel rather than a mutex so that a
	// caller queued behind a slow writer can still give up on ctx.
	wsem chan struct{}

	mu      sync.Mutex
	pending map[string]chan reply
	subs    map[uint64]*subscriber
	nextSub uint64
	closed  bool  // set once by shutdown
	closing bool  // Close was called, so a read error is expected
	err     error // why the monitor ended; nil while open
	done    chan struct{}
}

// Dial connects to a QMP unix socket and performs the handshake.
func Dial(ctx context.Context, path string) (*Monitor, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("qmp: dial %s: %w", path, err)
	}
	return New(ctx, conn)
}

// New performs the QMP handshake (greeting, then qmp_capabilities) over an
// existing connection and starts the reader. ctx bounds only the handshake,
// not the lifetime of the Monitor. On failure conn is closed, since a
// half-negotiated QMP session cannot be reused.
func New(ctx context.Context, conn net.Conn) (*Monitor, error) {
	dec := json.NewDecoder(conn)

	// A blocking read cannot watch ctx, so closing the connection is the
	// only way to unblock it when the peer never sends a greeting.
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	var greeting message
	err := dec.Decode(&greeting)
	if !stop() {
		conn.Close()
		return nil, fmt.Errorf("qmp: read greeting: %w", context.Cause(ctx))
	}
	if err != nil {
		conn.Close()
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return nil, fmt.Errorf("qmp: read greeting: %w", err)
	}
	if greeting.QMP == nil {
		conn.Close()
		return nil, errors.New("qmp: read greeting: first message is not a QMP greeting")
	}

	m := &Monitor{
		conn:    conn,
		version: greeting.QMP.Version.version(),
		wsem:    make(chan struct{}, 1),
		pending: make(map[string]chan reply),
		subs:    make(map[uint64]*subscriber),
		done:    make(chan struct{}),
	}
	go m.readLoop(dec)

	// Run's error already names qmp_capabilities; wrapping again would only
	// stack prefixes.
	if err := m.Run(ctx, "qmp_capabilities", nil, nil); err != nil {
		m.Close()
		return nil, err
	}
	return m, nil
}

// Version returns the QEMU version announced in the greeting, which is
// available without a round trip.
func (m *Monitor) Version() Version { return m.version }

// Done is closed when the connection ends for any reason, so supervisors
// can notice QEMU exiting without polling.
func (m *Monitor) Done() <-chan struct{} { return m.done }

// Err reports why the monitor ended. It is nil while the monitor is open
// and always wraps ErrClosed afterwards (plus the cause, if any).
func (m *Monitor) Err() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.err
}

// Close closes the connection and waits until the monitor has fully shut
// down, so that Done and Err are settled when it returns. Calling Close
// more than once is harmless.
func (m *Monitor) Close() error {
	m.mu.Lock()
	already := m.closed
	m.closing = true
	m.mu.Unlock()
	if already {
		<-m.done
		return nil
	}
	err := m.conn.Close()
	<-m.done
	if err != nil && !errors.Is(err, net.ErrClosed) {
		return fmt.Errorf("qmp: close: %w", err)
	}
	return nil
}

// Run executes a QMP command. args, if non-nil, is marshaled as the
// command's "arguments"; resp, if non-nil, receives the unmarshaled
// "return" value. A QMP error reply is returned as a wrapped *Error.
//
// If ctx ends first Run returns its error; the reply, should it arrive
// later, is discarded, and the command may still have taken effect in QEMU.
func (m *Monitor) Run(ctx context.Context, cmd string, args any, resp any) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("qmp: %s: %w", cmd, err)
	}
	id := strconv.FormatUint(m.nextID.Add(1), 10)
	b, err := json.Marshal(request{Execute: cmd, Arguments: args, ID: id})
	if err != nil {
		return fmt.Errorf("qmp: %s: encode arguments: %w", cmd, err)
	}
	b = append(b, '\n')

	ch := make(chan reply, 1)
	m.mu.Lock()
	if m.closed {
		err := m.err
		m.mu.Unlock()
		return fmt.Errorf("qmp: %s: %w", cmd, err)
	}
	m.pending[id] = ch
	m.mu.Unlock()
	defer func() {
		m.mu.Lock()
		delete(m.pending, id)
		m.mu.Unlock()
	}()

	if err := m.write(ctx, b); err != nil {
		return fmt.Errorf("qmp: %s: %w", cmd, err)
	}

	var r reply
	select {
	case r = <-ch:
	case <-ctx.Done():
		return fmt.Errorf("qmp: %s: %w", cmd, ctx.Err())
	case <-m.done:
		// The reader delivers before shutting down, so a reply that made
		// it in just before the end must win over the close.
		select {
		case r = <-ch:
		default:
			return fmt.Errorf("qmp: %s: %w", cmd, m.Err())
		}
	}
	if r.err != nil {
		return fmt.Errorf("qmp: %s: %w", cmd, r.err)
	}
	if resp != nil {
		if err := json.Unmarshal(r.ret, resp); err != nil {
			return fmt.Errorf("qmp: %s: decode return: %w", cmd, err)
		}
	}
	return nil
}

// write sends one complete request. A write that is interrupted part-way
// would leave a truncated JSON object on the wire and desynchronize QEMU's
// parser, so in that case the whole monitor is shut down rather than
// letting later commands fail in confusing ways.
func (m *Monitor) write(ctx context.Context, b []byte) error {
	select {
	case m.wsem <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	case <-m.done:
		return m.Err()
	}
	defer func() { <-m.wsem }()

	fired := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		m.conn.SetWriteDeadline(time.Unix(1, 0))
		close(fired)
	})
	n, err := m.conn.Write(b)
	if !stop() {
		// Wait for the deadline to be set before clearing it, or it could
		// land after the reset and fail the next caller's write.
		<-fired
		m.conn.SetWriteDeadline(time.Time{})
	}
	if err == nil {
		return nil
	}
	if n == 0 && ctx.Err() != nil {
		return ctx.Err()
	}
	m.shutdown(fmt.Errorf("write: %w", err))
	return m.Err()
}

func (m *Monitor) readLoop(dec *json.Decoder) {
	for {
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			if !errors.Is(err, io.EOF) {
				var se *json.SyntaxError
				if errors.As(err, &se) {
					err = fmt.Errorf("decode message: %w", err)
				}
			}
			m.shutdown(err)
			return
		}
		m.dispatch(raw)
	}
}

func (m *Monitor) dispatch(raw json.RawMessage) {
	var msg message
	decErr := json.Unmarshal(raw, &msg)

	if len(msg.ID) > 0 {
		var id string
		if json.Unmarshal(msg.ID, &id) != nil {
			return // not one of our ids
		}
		m.mu.Lock()
		ch := m.pending[id]
		delete(m.pending, id)
		m.mu.Unlock()
		if ch == nil {
			return // late reply to a cancelled Run, or unknown id
		}
		switch {
		case decErr != nil:
			ch <- reply{err: fmt.Errorf("malformed reply: %w", decErr)}
		case msg.Error != nil:
			ch <- reply{err: msg.Error}
		case msg.Return != nil:
			ch <- reply{ret: msg.Return}
		default:
			ch <- reply{err: fmt.Errorf("malformed reply: neither return nor error: %.200s", raw)}
		}
		return
	}

	if decErr != nil || msg.Event == "" {
		return
	}
	ev := Event{Name: msg.Event, Data: msg.Data}
	if ts := msg.Timestamp; ts != nil && ts.Seconds >= 0 {
		ev.Time = time.Unix(ts.Seconds, ts.Microseconds*1000)
	}
	m.mu.Lock()
	for _, s := range m.subs {
		s.push(ev)
	}
	m.mu.Unlock()
}

// shutdown ends the monitor exactly once. Pending Run calls notice via
// done; subscribers are told to drain and close.
func (m *Monitor) shutdown(cause error) {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return
	}
	m.closed = true
	if m.closing || cause == nil {
		m.err = ErrClosed
	} else {
		m.err = fmt.Errorf("%w: %w", ErrClosed, cause)
	}
	subs := m.subs
	m.subs = nil
	m.mu.Unlock()

	m.conn.Close()
	close(m.done)
	for _, s := range subs {
		s.end()
	}
}

// Subscribe returns a channel that receives every event arriving after the
// call, in order. Each subscriber has its own unbounded queue so a slow or
// stalled consumer can neither block the reader (and with it all command
// replies) nor lose events. The channel is closed after the queued events
// have been delivered once the monitor ends, or immediately when cancel is
// called; call cancel when done to release the subscriber's goroutine.
func (m *Monitor) Subscribe() (<-chan Event, func()) {
	s := &subscriber{
		out:  make(chan Event),
		wake: make(chan struct{}, 1),
		quit: make(chan struct{}),
	}
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		close(s.out)
		return s.out, func() {}
	}
	key := m.nextSub
	m.nextSub++
	m.subs[key] = s
	m.mu.Unlock()

	go s.run()
	var once sync.Once
	cancel := func() {
		once.Do(func() {
			m.mu.Lock()
			delete(m.subs, key) // no-op once shutdown has cleared the map
			m.mu.Unlock()
			close(s.quit)
		})
	}
	return s.out, cancel
}

type subscriber struct {
	out  chan Event
	wake chan struct{} // capacity 1: "the queue or ended changed"
	quit chan struct{} // closed by cancel

	mu    sync.Mutex
	queue []Event
	ended bool
}

func (s *subscriber) push(ev Event) {
	s.mu.Lock()
	s.queue = append(s.queue, ev)
	s.mu.Unlock()
	s.notify()
}

func (s *subscriber) end() {
	s.mu.Lock()
	s.ended = true
	s.mu.Unlock()
	s.notify()
}

func (s *subscriber) notify() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

func (s *subscriber) run() {
	defer close(s.out)
	for {
		s.mu.Lock()
		if len(s.queue) == 0 {
			s.queue = nil // let a burst's backing array be collected
			ended := s.ended
			s.mu.Unlock()
			if ended {
				return
			}
			select {
			case <-s.wake:
				continue
			case <-s.quit:
				return
			}
		}
		ev := s.queue[0]
		s.queue[0] = Event{}
		s.queue = s.queue[1:]
		s.mu.Unlock()

		select {
		case s.out <- ev:
		case <-s.quit:
			return
		}
	}
}
