package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

const greeting = `{"QMP": {"version": {"qemu": {"micro": 1, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7"}, "capabilities": ["oob"]}}`

// fakeServer is the QEMU side of a net.Pipe. Its methods run on the test
// goroutine so they can use t.Fatalf; the Monitor calls under test run in
// their own goroutines.
type fakeServer struct {
	t    *testing.T
	conn net.Conn
	dec  *json.Decoder
	mu   sync.Mutex // serializes writes from helper goroutines
}

type fakeRequest struct {
	Execute   string          `json:"execute"`
	Arguments json.RawMessage `json:"arguments"`
	ID        json.RawMessage `json:"id"`
}

func newFakeServer(t *testing.T, conn net.Conn) *fakeServer {
	t.Helper()
	return &fakeServer{t: t, conn: conn, dec: json.NewDecoder(conn)}
}

func (s *fakeServer) sendRaw(line string) {
	s.t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	s.conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := s.conn.Write([]byte(line + "\r\n")); err != nil {
		s.t.Fatalf("fake server write: %v", err)
	}
}

func (s *fakeServer) send(v any) {
	s.t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		s.t.Fatalf("marshal: %v", err)
	}
	s.sendRaw(string(b))
}

func (s *fakeServer) recv() fakeRequest {
	s.t.Helper()
	s.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	var r fakeRequest
	if err := s.dec.Decode(&r); err != nil {
		s.t.Fatalf("fake server read: %v", err)
	}
	return r
}

// expect reads one request and checks its command name.
func (s *fakeServer) expect(cmd string) fakeRequest {
	s.t.Helper()
	r := s.recv()
	if r.Execute != cmd {
		s.t.Fatalf("got command %q, want %q", r.Execute, cmd)
	}
	if len(r.ID) == 0 {
		s.t.Fatalf("command %q sent without id", cmd)
	}
	return r
}

func (s *fakeServer) reply(id json.RawMessage, ret any) {
	s.t.Helper()
	s.send(map[string]any{"return": ret, "id": id})
}

func (s *fakeServer) replyError(id json.RawMessage, class, desc string) {
	s.t.Helper()
	s.send(map[string]any{"error": map[string]string{"class": class, "desc": desc}, "id": id})
}

func (s *fakeServer) event(name string, data any, sec, usec int64) {
	s.t.Helper()
	s.send(map[string]any{
		"event":     name,
		"data":      data,
		"timestamp": map[string]int64{"seconds": sec, "microseconds": usec},
	})
}

// newPair returns a negotiated Monitor and the server side of its pipe.
func newPair(t *testing.T) (*Monitor, *fakeServer) {
	t.Helper()
	client, server := net.Pipe()
	s := newFakeServer(t, server)
	t.Cleanup(func() { server.Close() })

	type result struct {
		m   *Monitor
		err error
	}
	res := make(chan result, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		m, err := New(ctx, client)
		res <- result{m, err}
	}()

	s.sendRaw(greeting)
	r := s.expect("qmp_capabilities")
	if len(r.Arguments) != 0 {
		t.Fatalf("qmp_capabilities sent arguments %s, want none", r.Arguments)
	}
	s.reply(r.ID, struct{}{})

	got := <-res
	if got.err != nil {
		t.Fatalf("New: %v", got.err)
	}
	t.Cleanup(func() { got.m.Close() })
	return got.m, s
}

// async runs f in a goroutine and returns a channel with its error.
func async(f func() error) <-chan error {
	ch := make(chan error, 1)
	go func() { ch <- f() }()
	return ch
}

func wait(t *testing.T, ch <-chan error) error {
	t.Helper()
	select {
	case err := <-ch:
		return err
	case <-time.After(5 * time.Second):
		t.Fatalf("timed out waiting for call to return")
		return nil
	}
}

func waitClosed(t *testing.T, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(5 * time.Second):
		t.Fatalf("%s not closed", what)
	}
}

func recvEvent(t *testing.T, ch <-chan Event) Event {
	t.Helper()
	select {
	case ev, ok := <-ch:
		if !ok {
			t.Fatalf("event channel closed unexpectedly")
		}
		return ev
	case <-time.After(5 * time.Second):
		t.Fatalf("timed out waiting for event")
		return Event{}
	}
}

// drainUntilClosed discards events until ch closes; cancel may race with
// events already queued, so their delivery is allowed but not required.
func drainUntilClosed(t *testing.T, ch <-chan Event) {
	t.Helper()
	deadline := time.After(5 * time.Second)
	for {
		select {
		case _, ok := <-ch:
			if !ok {
				return
			}
		case <-deadline:
			t.Fatalf("event channel not closed")
		}
	}
}

func TestHandshake(t *testing.T) {
	m, _ := newPair(t)
	want := Version{Major: 7, Minor: 2, Micro: 1, Package: "Debian 1:7.2+dfsg-7"}
	if got := m.Version(); got != want {
		t.Fatalf("Version() = %+v, want %+v", got, want)
	}
	if err := m.Err(); err != nil {
		t.Fatalf("Err() on open monitor = %v, want nil", err)
	}
	select {
	case <-m.Done():
		t.Fatalf("Done closed on open monitor")
	default:
	}
}

func TestHandshakeFailures(t *testing.T) {
	tests := []struct {
		name    string
		server  func(s *fakeServer)
		wantErr string
		wantAs  bool // error wraps *Error
	}{
		{
			name:    "not a greeting",
			server:  func(s *fakeServer) { s.sendRaw(`{"return": {}}`) },
			wantErr: "not a QMP greeting",
		},
		{
			name:    "malformed greeting",
			server:  func(s *fakeServer) { s.sendRaw(`{"QMP": nope`) },
			wantErr: "read greeting",
		},
		{
			name:    "eof before greeting",
			server:  func(s *fakeServer) { s.conn.Close() },
			wantErr: "unexpected EOF",
		},
		{
			name: "capabilities rejected",
			server: func(s *fakeServer) {
				s.sendRaw(greeting)
				r := s.expect("qmp_capabilities")
				s.replyError(r.ID, "CommandNotFound", "nope")
			},
			wantErr: "qmp: qmp_capabilities: qmp: CommandNotFound: nope",
			wantAs:  true,
		},
		{
			name: "closed during negotiation",
			server: func(s *fakeServer) {
				s.sendRaw(greeting)
				s.expect("qmp_capabilities")
				s.conn.Close()
			},
			wantErr: "monitor closed",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			client, server := net.Pipe()
			defer server.Close()
			s := newFakeServer(t, server)
			done := async(func() error {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				m, err := New(ctx, client)
				if err == nil {
					m.Close()
					return errors.New("New succeeded")
				}
				return err
			})
			tt.server(s)
			err := wait(t, done)
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("New error = %q, want it to contain %q", err, tt.wantErr)
			}
			var qe *Error
			if got := errors.As(err, &qe); got != tt.wantAs {
				t.Fatalf("errors.As(*Error) = %v, want %v (err %v)", got, tt.wantAs, err)
			}
		})
	}
}

func TestHandshakeContextTimeout(t *testing.T) {
	client, server := net.Pipe()
	defer server.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, err := New(ctx, client) // server never sends a greeting
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("New error = %v, want DeadlineExceeded", err)
	}
}

func TestDialUnixSocket(t *testing.T) {
	sock := t.TempDir() + "/qmp.sock"
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	defer l.Close()
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		c.Write([]byte(greeting + "\r\n"))
		dec := json.NewDecoder(c)
		enc := json.NewEncoder(c)
		for {
			var r fakeRequest
			if dec.Decode(&r) != nil {
				return
			}
			enc.Encode(map[string]any{"return": map[string]any{"status": "running", "running": true}, "id": r.ID})
		}
	}()

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	m, err := Dial(ctx, sock)
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	defer m.Close()
	st, err := m.QueryStatus(ctx)
	if err != nil || !st.Running {
		t.Fatalf("QueryStatus = %+v, %v", st, err)
	}

	if _, err := Dial(ctx, t.TempDir()+"/missing.sock"); err == nil || !strings.Contains(err.Error(), "qmp: dial") {
		t.Fatalf("Dial missing socket error = %v, want qmp: dial ...", err)
	}
}

func TestRunReturn(t *testing.T) {
	type echo struct {
		A string `json:"a"`
		B int    `json:"b"`
	}
	tests := []struct {
		name     string
		args     any
		wantArgs string // "" means no "arguments" member
		ret      string
		resp     any
		want     any
	}{
		{
			name: "no args struct resp",
			ret:  `{"status": "paused", "running": false, "singlestep": false}`,
			resp: &Status{},
			want: &Status{Status: "paused"},
		},
		{
			name:     "map args",
			args:     map[string]any{"a": "x", "b": 2},
			wantArgs: `{"a":"x","b":2}`,
			ret:      `{"a": "x", "b": 2}`,
			resp:     &echo{},
			want:     &echo{A: "x", B: 2},
		},
		{
			name:     "struct args nil resp",
			args:     echo{A: "y"},
			wantArgs: `{"a":"y","b":0}`,
			ret:      `{}`,
		},
		{
			name: "array return",
			ret:  `[1, 2, 3]`,
			resp: &[]int{},
			want: &[]int{1, 2, 3},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, s := newPair(t)
			done := async(func() error { return m.Run(context.Background(), "test-cmd", tt.args, tt.resp) })
			r := s.expect("test-cmd")
			if got := string(r.Arguments); got != tt.wantArgs {
				t.Fatalf("arguments = %q, want %q", got, tt.wantArgs)
			}
			s.reply(r.ID, json.RawMessage(tt.ret))
			if err := wait(t, done); err != nil {
				t.Fatalf("Run: %v", err)
			}
			if tt.want != nil {
				got, _ := json.Marshal(tt.resp)
				want, _ := json.Marshal(tt.want)
				if string(got) != string(want) {
					t.Fatalf("resp = %s, want %s", got, want)
				}
			}
		})
	}
}

func TestRunErrors(t *testing.T) {
	tests := []struct {
		name    string
		args    any
		resp    any
		server  func(s *fakeServer, r fakeRequest)
		wantErr string
		check   func(t *testing.T, err error)
	}{
		{
			name: "qmp error reply",
			server: func(s *fakeServer, r fakeRequest) {
				s.replyError(r.ID, "DeviceNotFound", "Device 'x' not found")
			},
			wantErr: "qmp: test-cmd: qmp: DeviceNotFound: Device 'x' not found",
			check: func(t *testing.T, err error) {
				var qe *Error
				if !errors.As(err, &qe) {
					t.Fatalf("errors.As(%v, *Error) = false", err)
				}
				if qe.Class != "DeviceNotFound" || qe.Desc != "Device 'x' not found" {
					t.Fatalf("Error = %+v", qe)
				}
			},
		},
		{
			name: "return does not fit resp",
			resp: &Status{},
			server: func(s *fakeServer, r fakeRequest) {
				s.reply(r.ID, "a string")
			},
			wantErr: "qmp: test-cmd: decode return:",
		},
		{
			name: "reply with neither return nor error",
			server: func(s *fakeServer, r fakeRequest) {
				s.send(map[string]any{"id": r.ID})
			},
			wantErr: "malformed reply",
		},
		{
			name: "reply with ill-typed error",
			server: func(s *fakeServer, r fakeRequest) {
				s.send(map[string]any{"id": r.ID, "error": "boom"})
			},
			wantErr: "malformed reply",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, s := newPair(t)
			done := async(func() error { return m.Run(context.Background(), "test-cmd", tt.args, tt.resp) })
			tt.server(s, s.expect("test-cmd"))
			err := wait(t, done)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("Run error = %v, want it to contain %q", err, tt.wantErr)
			}
			if tt.check != nil {
				tt.check(t, err)
			}
			// A bad reply to one command must not poison the monitor.
			done = async(func() error { return m.Run(context.Background(), "after", nil, nil) })
			s.reply(s.expect("after").ID, struct{}{})
			if err := wait(t, done); err != nil {
				t.Fatalf("Run after bad reply: %v", err)
			}
		})
	}
}

func TestRunBadArguments(t *testing.T) {
	m, _ := newPair(t)
	err := m.Run(context.Background(), "test-cmd", map[string]any{"f": func() {}}, nil)
	if err == nil || !strings.Contains(err.Error(), "encode arguments") {
		t.Fatalf("Run error = %v, want encode arguments error", err)
	}
}

func TestEventsBeforeReply(t *testing.T) {
	m, s := newPair(t)
	sub1, cancel1 := m.Subscribe()
	defer cancel1()
	sub2, cancel2 := m.Subscribe()
	defer cancel2()

	var st Status
	done := async(func() error { return m.Run(context.Background(), "query-status", nil, &st) })
	r := s.expect("query-status")
	s.event("STOP", nil, 1700000000, 250)
	s.event("BLOCK_IO_ERROR", map[string]any{"device": "vda", "operation": "write"}, 1700000001, 0)
	s.reply(r.ID, map[string]any{"status": "paused", "running": false})
	if err := wait(t, done); err != nil {
		t.Fatalf("Run: %v", err)
	}
	if st.Status != "paused" {
		t.Fatalf("status = %q, want paused", st.Status)
	}

	for i, sub := range []<-chan Event{sub1, sub2} {
		ev := recvEvent(t, sub)
		if ev.Name != "STOP" || !ev.Time.Equal(time.Unix(1700000000, 250000)) {
			t.Fatalf("sub%d first event = %+v, want STOP at 1700000000.000250", i+1, ev)
		}
		ev = recvEvent(t, sub)
		if ev.Name != "BLOCK_IO_ERROR" {
			t.Fatalf("sub%d second event = %q, want BLOCK_IO_ERROR", i+1, ev.Name)
		}
		var data struct{ Device string }
		if err := json.Unmarshal(ev.Data, &data); err != nil || data.Device != "vda" {
			t.Fatalf("sub%d event data = %s (%v), want device vda", i+1, ev.Data, err)
		}
	}
}

func TestSlowSubscriberDoesNotBlock(t *testing.T) {
	m, s := newPair(t)
	slow, cancel := m.Subscribe()
	defer cancel()

	const n = 500
	for i := range n {
		s.event("EV", map[string]int{"i": i}, int64(i), 0)
	}
	// The reader must still process replies while nobody reads events.
	done := async(func() error { return m.Run(context.Background(), "ping", nil, nil) })
	s.reply(s.expect("ping").ID, struct{}{})
	if err := wait(t, done); err != nil {
		t.Fatalf("Run with stalled subscriber: %v", err)
	}

	for i := range n {
		ev := recvEvent(t, slow)
		var d struct{ I int }
		json.Unmarshal(ev.Data, &d)
		if d.I != i {
			t.Fatalf("event %d has i=%d: events lost or reordered", i, d.I)
		}
	}
}

func TestSubscribeCancel(t *testing.T) {
	m, s := newPair(t)
	ch, cancel := m.Subscribe()
	s.event("A", nil, 1, 0)
	// A must have been dispatched before the cancel: else the reader may
	// still hold it when the next subscriber comes, and rightly give it
	// to that one (seen in CI).
	if ev := recvEvent(t, ch); ev.Name != "A" {
		t.Fatalf("got %q, want A", ev.Name)
	}
	cancel()
	cancel() // idempotent
	drainUntilClosed(t, ch)
	// Events after cancel must not reach (or block on) the old subscriber.
	other, cancel2 := m.Subscribe()
	defer cancel2()
	s.event("B", nil, 2, 0)
	if ev := recvEvent(t, other); ev.Name != "B" {
		t.Fatalf("got %q, want B", ev.Name)
	}
}

func TestConcurrentRun(t *testing.T) {
	m, s := newPair(t)
	const n = 20
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var got int
			if err := m.Run(context.Background(), "echo", map[string]int{"n": i}, &got); err != nil {
				errs <- err
				return
			}
			if got != i {
				errs <- fmt.Errorf("call %d got reply %d", i, got)
			}
		}()
	}

	reqs := make([]fakeRequest, n)
	ids := make(map[string]bool)
	for i := range reqs {
		reqs[i] = s.expect("echo")
		if ids[string(reqs[i].ID)] {
			t.Fatalf("duplicate id %s", reqs[i].ID)
		}
		ids[string(reqs[i].ID)] = true
	}
	// Reply in reverse order, with an event in between, so only id
	// matching can pair them correctly.
	for i := n - 1; i >= 0; i-- {
		var a struct{ N int }
		if err := json.Unmarshal(reqs[i].Arguments, &a); err != nil {
			t.Fatalf("arguments %s: %v", reqs[i].Arguments, err)
		}
		s.reply(reqs[i].ID, a.N)
		if i == n/2 {
			s.event("NOISE", nil, 0, 0)
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("concurrent Run: %v", err)
	}
}

func TestRunContextTimeoutThenLaterCommand(t *testing.T) {
	m, s := newPair(t)

	done := async(func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		return m.Run(ctx, "slow", nil, nil)
	})
	slow := s.expect("slow")
	err := wait(t, done)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Run error = %v, want DeadlineExceeded", err)
	}
	if !strings.HasPrefix(err.Error(), "qmp: slow:") {
		t.Fatalf("Run error %q does not name the command", err)
	}

	var got string
	done = async(func() error { return m.Run(context.Background(), "fast", nil, &got) })
	fast := s.expect("fast")
	s.reply(slow.ID, "late") // must be discarded, not given to "fast"
	s.reply(fast.ID, "fast-reply")
	if err := wait(t, done); err != nil {
		t.Fatalf("Run after timeout: %v", err)
	}
	if got != "fast-reply" {
		t.Fatalf("got %q, want fast-reply", got)
	}
}

func TestRunAlreadyCancelled(t *testing.T) {
	m, _ := newPair(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	// Nothing reads the server side, so this would hang if Run wrote.
	if err := m.Run(ctx, "x", nil, nil); !errors.Is(err, context.Canceled) {
		t.Fatalf("Run error = %v, want Canceled", err)
	}
}

func TestRunContextCancelledWhileWriting(t *testing.T) {
	m, s := newPair(t)
	// The fake server is not reading, so the pipe write blocks; the ctx
	// deadline must still unblock Run without breaking the connection.
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := m.Run(ctx, "blocked", nil, nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Run error = %v, want DeadlineExceeded", err)
	}
	done := async(func() error { return m.Run(context.Background(), "next", nil, nil) })
	s.reply(s.expect("next").ID, struct{}{})
	if err := wait(t, done); err != nil {
		t.Fatalf("Run after cancelled write: %v", err)
	}
}

func TestUnknownIDIgnored(t *testing.T) {
	m, s := newPair(t)
	done := async(func() error { return m.Run(context.Background(), "x", nil, nil) })
	r := s.expect("x")
	s.reply(json.RawMessage(`"no-such-id"`), 1)
	s.reply(json.RawMessage(`42`), 1)
	s.sendRaw(`{"something": "else"}`)
	s.reply(r.ID, struct{}{})
	if err := wait(t, done); err != nil {
		t.Fatalf("Run: %v", err)
	}
}

func TestConnectionClosedMidCommand(t *testing.T) {
	m, s := newPair(t)
	sub, cancel := m.Subscribe()
	defer cancel()

	done := async(func() error { return m.Run(context.Background(), "query-status", nil, nil) })
	s.expect("query-status")
	s.event("SHUTDOWN", nil, 1, 0)
	s.conn.Close()

	err := wait(t, done)
	if !errors.Is(err, ErrClosed) {
		t.Fatalf("Run error = %v, want ErrClosed", err)
	}
	if !strings.Contains(err.Error(), "query-status") {
		t.Fatalf("Run error %q does not name the command", err)
	}
	waitClosed(t, m.Done(), "Done")
	if err := m.Err(); !errors.Is(err, ErrClosed) {
		t.Fatalf("Err() = %v, want ErrClosed", err)
	}

	// Events queued before the end are still delivered, then the channel closes.
	if ev := recvEvent(t, sub); ev.Name != "SHUTDOWN" {
		t.Fatalf("got %q, want SHUTDOWN", ev.Name)
	}
	select {
	case _, ok := <-sub:
		if ok {
			t.Fatalf("unexpected extra event")
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("subscriber channel not closed")
	}

	if err := m.Run(context.Background(), "again", nil, nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("Run after close = %v, want ErrClosed", err)
	}
	late, _ := m.Subscribe()
	if _, ok := <-late; ok {
		t.Fatalf("Subscribe after close returned an open channel")
	}
}

func TestMalformedJSONEndsMonitor(t *testing.T) {
	m, s := newPair(t)
	done := async(func() error { return m.Run(context.Background(), "x", nil, nil) })
	s.expect("x")
	go s.conn.Write([]byte("{\"return\": }\r\n")) // may block: the monitor stops reading
	err := wait(t, done)
	if !errors.Is(err, ErrClosed) {
		t.Fatalf("Run error = %v, want ErrClosed", err)
	}
	waitClosed(t, m.Done(), "Done")
	if err := m.Err(); err == nil || !strings.Contains(err.Error(), "decode message") {
		t.Fatalf("Err() = %v, want decode message error", err)
	}
}

func TestClose(t *testing.T) {
	m, s := newPair(t)
	sub, cancel := m.Subscribe()
	defer cancel()

	done := async(func() error { return m.Run(context.Background(), "pending", nil, nil) })
	s.expect("pending")
	if err := m.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	waitClosed(t, m.Done(), "Done")
	if err := m.Err(); err != ErrClosed {
		t.Fatalf("Err() after Close = %v, want exactly ErrClosed", err)
	}
	if err := wait(t, done); !errors.Is(err, ErrClosed) {
		t.Fatalf("pending Run = %v, want ErrClosed", err)
	}
	if _, ok := <-sub; ok {
		t.Fatalf("subscriber channel open after Close")
	}
	if err := m.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

func TestHMP(t *testing.T) {
	m, s := newPair(t)
	type result struct {
		out string
		err error
	}
	res := make(chan result, 1)
	go func() {
		out, err := m.HMP(context.Background(), "info version")
		res <- result{out, err}
	}()
	r := s.expect("human-monitor-command")
	var args map[string]string
	if err := json.Unmarshal(r.Arguments, &args); err != nil || args["command-line"] != "info version" {
		t.Fatalf("arguments = %s (%v), want command-line \"info version\"", r.Arguments, err)
	}
	s.reply(r.ID, "7.2.1\r\n")
	select {
	case got := <-res:
		if got.err != nil || got.out != "7.2.1\r\n" {
			t.Fatalf("HMP = %q, %v", got.out, got.err)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("HMP did not return")
	}
}

func TestErrorMessage(t *testing.T) {
	e := &Error{Class: "GenericError", Desc: "boom"}
	if got := e.Error(); got != "qmp: GenericError: boom" {
		t.Fatalf("Error() = %q", got)
	}
}
