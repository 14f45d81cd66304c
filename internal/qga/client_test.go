package qga

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestDialSynchronises(t *testing.T) {
	tests := []struct {
		name      string
		halfLine  bool
		onConnect func() string
	}{
		{name: "clean agent"},
		{name: "half request left by an earlier client", halfLine: true},
		{
			name: "stale output before the sync answer",
			onConnect: func() string {
				return `{"return": {}}` + "\n" + // answer meant for an earlier client
					"\xff" + `{"return": 42}` + "\n" + // an earlier client's sync
					agentError("GenericError", "old") +
					"\x00\x01 binary junk \xfe\n" +
					`{"return": "half an answer`
			},
		},
		{
			name: "megabytes of stale data and long garbage after a stray sentinel",
			onConnect: func() string {
				return strings.Repeat("x", 3<<20) + "\n" +
					"\xff" + strings.Repeat("y", 100<<10) + "\n"
			},
		},
		{
			name: "two sentinels on one line",
			onConnect: func() string {
				return "\xffjunk\xff" + `{"return": 7}` + "\n"
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := newFakeAgent(t)
			a.set(func(a *fakeAgent) {
				a.halfLine = tt.halfLine
				a.onConnect = tt.onConnect
			})
			c := a.dial(t)
			if err := c.Ping(long(t)); err != nil {
				t.Fatalf("ping after dial: %v", err)
			}
			log := a.log()
			if len(log) != 2 || log[0].Execute != "guest-sync-delimited" || log[1].Execute != "guest-ping" {
				t.Fatalf("agent saw %v, want sync then ping", log)
			}
			var args struct {
				ID *int64 `json:"id"`
			}
			if err := json.Unmarshal(log[0].Arguments, &args); err != nil || args.ID == nil {
				t.Fatalf("sync arguments %s: want an id", log[0].Arguments)
			}
			if n := a.sentinelCount(); n != 1 {
				t.Fatalf("client sent %d sentinel bytes, want 1 before the sync", n)
			}
		})
	}
}

func TestDialFails(t *testing.T) {
	tests := []struct {
		name    string
		setup   func(a *fakeAgent)
		want    error
		noAgent bool
	}{
		{
			name:  "agent silent",
			setup: func(a *fakeAgent) { a.handle("guest-sync-delimited", func(fakeRequest) string { return "" }) },
			want:  ErrNoAnswer,
		},
		{
			name: "only a sync answer with another id",
			setup: func(a *fakeAgent) {
				a.handle("guest-sync-delimited", func(fakeRequest) string { return "\xff" + ret(12345) })
			},
			want: ErrNoAnswer,
		},
		{
			name: "sync answer without sentinel",
			setup: func(a *fakeAgent) {
				a.handle("guest-sync-delimited", func(r fakeRequest) string { return syncHandler(r)[1:] })
			},
			want: ErrNoAnswer,
		},
		{
			name:  "connection closed",
			setup: func(a *fakeAgent) { a.handle("guest-sync-delimited", func(fakeRequest) string { return closeConn }) },
			want:  io.EOF,
		},
		{name: "no socket", noAgent: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "missing.sock")
			if !tt.noAgent {
				a := newFakeAgent(t)
				tt.setup(a)
				path = a.path
			}
			c, err := Dial(short(t), path)
			if err == nil {
				c.Close()
				t.Fatal("dial succeeded")
			}
			if tt.want != nil && !errors.Is(err, tt.want) {
				t.Fatalf("dial: %v, want %v", err, tt.want)
			}
			if errors.Is(err, ErrNoAnswer) && !errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("%v does not wrap context.DeadlineExceeded", err)
			}
		})
	}
}

func TestRunAnswers(t *testing.T) {
	tests := []struct {
		name   string
		answer string
		resp   any
		want   any   // expected *resp on success
		err    error // nil, ErrProtocol, ErrNoAnswer, io.EOF, or an *Error to match
		// keepsConn: the connection stays in step, so no redial follows.
		keepsConn bool
	}{
		{
			name:      "object",
			answer:    `{"return": {"a": 1, "b": [true]}}` + "\n",
			resp:      &map[string]any{},
			want:      &map[string]any{"a": 1.0, "b": []any{true}},
			keepsConn: true,
		},
		{
			name:      "answer ignored when resp is nil",
			answer:    ret("whatever"),
			keepsConn: true,
		},
		{
			name:      "CRLF line ending",
			answer:    `{"return": 5}` + "\r\n",
			resp:      new(int),
			want:      ptr(5),
			keepsConn: true,
		},
		{
			name:      "error answer",
			answer:    agentError("GenericError", "Invalid parameter 'pid'"),
			err:       &Error{Class: "GenericError", Desc: "Invalid parameter 'pid'"},
			keepsConn: true,
		},
		{name: "not JSON", answer: "garbage\n", err: ErrProtocol},
		{name: "JSON but not an object", answer: "[1, 2]\n", err: ErrProtocol},
		{name: "neither return nor error", answer: `{"QMP": {}}` + "\n", err: ErrProtocol},
		{name: "null return", answer: `{"return": null}` + "\n", err: ErrProtocol},
		{name: "both return and error", answer: `{"return": 1, "error": {"class": "X", "desc": "y"}}` + "\n", err: ErrProtocol},
		{name: "error of the wrong shape", answer: `{"error": "boom"}` + "\n", err: ErrProtocol},
		{name: "return of the wrong type", answer: ret("text"), resp: new(int), err: ErrProtocol},
		{name: "sentinel where an answer belongs", answer: "\xff" + ret(1), err: ErrProtocol},
		{name: "line over the bound", answer: `{"return": "` + strings.Repeat("A", maxAnswer) + `"}` + "\n", err: ErrProtocol},
		{name: "silence", answer: "", err: ErrNoAnswer},
		{name: "hang up", answer: closeConn, err: io.EOF},
		{name: "hang up mid-line", answer: `{"return": {"a"` + closeAfter, err: io.ErrUnexpectedEOF},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := newFakeAgent(t)
			var answered atomic.Bool
			a.handle("test-cmd", func(fakeRequest) string {
				if answered.Swap(true) {
					return ret(struct{}{})
				}
				return tt.answer
			})
			c := a.dial(t)
			ctx := long(t)
			if tt.err == ErrNoAnswer {
				ctx = short(t)
			}
			err := c.Run(ctx, "test-cmd", nil, tt.resp)

			var wantAgentErr *Error
			switch {
			case errors.As(tt.err, &wantAgentErr):
				var got *Error
				if !errors.As(err, &got) || *got != *wantAgentErr {
					t.Fatalf("err = %v, want agent error %v", err, wantAgentErr)
				}
			case tt.err != nil:
				if !errors.Is(err, tt.err) {
					t.Fatalf("err = %v, want %v", err, tt.err)
				}
			case err != nil:
				t.Fatalf("err = %v", err)
			default:
				if tt.want != nil {
					got, _ := json.Marshal(tt.resp)
					want, _ := json.Marshal(tt.want)
					if string(got) != string(want) {
						t.Fatalf("resp = %s, want %s", got, want)
					}
				}
			}
			if err != nil && !strings.HasPrefix(err.Error(), "qga: test-cmd: ") {
				t.Errorf("error %q does not name the command", err)
			}

			// Whatever happened, the next call works: over the same
			// connection if it is still in step, else over a new one.
			if err := c.Run(long(t), "test-cmd", nil, nil); err != nil {
				t.Fatalf("next call: %v", err)
			}
			wantConns := 2
			if tt.keepsConn {
				wantConns = 1
			}
			if got := a.connections(); got != wantConns {
				t.Fatalf("agent saw %d connections, want %d", got, wantConns)
			}
		})
	}
}

func ptr[T any](v T) *T { return &v }

func TestRunSendsRequest(t *testing.T) {
	tests := []struct {
		name string
		args any
		want string // the request line as the agent received it
	}{
		{name: "no arguments", want: `{"execute":"guest-ping"}`},
		{name: "arguments", args: map[string]any{"pid": 7}, want: `{"execute":"guest-ping","arguments":{"pid":7}}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := newFakeAgent(t)
			c := a.dial(t)
			if err := c.Run(long(t), "guest-ping", tt.args, nil); err != nil {
				t.Fatal(err)
			}
			log := a.log()
			got, _ := json.Marshal(log[len(log)-1])
			// Re-encode the expectation the same way to compare shapes.
			var want fakeRequest
			if err := json.Unmarshal([]byte(tt.want), &want); err != nil {
				t.Fatal(err)
			}
			wantb, _ := json.Marshal(want)
			if string(got) != string(wantb) {
				t.Fatalf("agent got %s, want %s", got, wantb)
			}
		})
	}
}

func TestRunRejectsUnencodableArguments(t *testing.T) {
	a := newFakeAgent(t)
	c := a.dial(t)
	err := c.Run(long(t), "guest-ping", map[string]any{"f": func() {}}, nil)
	if err == nil || errors.Is(err, ErrProtocol) {
		t.Fatalf("err = %v, want an encoding error", err)
	}
	if got := a.commands(); len(got) != 0 {
		t.Fatalf("agent received %v", got)
	}
}

func TestDeadlines(t *testing.T) {
	silent := func(fakeRequest) string { return "" }
	t.Run("caller cancels", func(t *testing.T) {
		a := newFakeAgent(t)
		a.handle("guest-ping", silent)
		c := a.dial(t)
		ctx, cancel := context.WithCancel(context.Background())
		time.AfterFunc(50*time.Millisecond, cancel)
		err := c.Ping(ctx)
		if !errors.Is(err, context.Canceled) || errors.Is(err, ErrNoAnswer) {
			t.Fatalf("err = %v, want context.Canceled only", err)
		}
	})
	t.Run("default timeout without a deadline", func(t *testing.T) {
		a := newFakeAgent(t)
		a.handle("guest-ping", silent)
		c := a.dial(t)
		c.timeout = 100 * time.Millisecond
		start := time.Now()
		err := c.Ping(context.Background())
		if !errors.Is(err, ErrNoAnswer) || !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("err = %v, want ErrNoAnswer", err)
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Fatalf("took %v", d)
		}
	})
	t.Run("queued call gives up on its own deadline", func(t *testing.T) {
		a := newFakeAgent(t)
		a.handle("guest-ping", silent)
		c := a.dial(t)
		slow := make(chan error, 1)
		go func() { slow <- c.Ping(long(t)) }()
		// Let the slow call take the turn.
		for len(a.commands()) == 0 {
			time.Sleep(time.Millisecond)
		}
		start := time.Now()
		err := c.Ping(short(t))
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("err = %v, want context.DeadlineExceeded", err)
		}
		if d := time.Since(start); d > time.Second {
			t.Fatalf("queued call took %v", d)
		}
		c.Close()
		if err := <-slow; !errors.Is(err, ErrClosed) {
			t.Fatalf("slow call: %v, want ErrClosed", err)
		}
	})
	t.Run("silence then recovery", func(t *testing.T) {
		a := newFakeAgent(t)
		var mu sync.Mutex
		hung := true
		a.handle("guest-ping", func(fakeRequest) string {
			mu.Lock()
			defer mu.Unlock()
			if hung {
				return ""
			}
			return ret(struct{}{})
		})
		c := a.dial(t)
		for range 2 {
			if err := c.Ping(short(t)); !errors.Is(err, ErrNoAnswer) {
				t.Fatalf("err = %v, want ErrNoAnswer", err)
			}
		}
		mu.Lock()
		hung = false
		mu.Unlock()
		if err := c.Ping(long(t)); err != nil {
			t.Fatalf("ping after the guest recovered: %v", err)
		}
	})
}

func TestClose(t *testing.T) {
	a := newFakeAgent(t)
	a.handle("guest-ping", func(fakeRequest) string { return "" })
	c := a.dial(t)
	done := make(chan error, 1)
	go func() { done <- c.Ping(long(t)) }()
	for len(a.commands()) == 0 {
		time.Sleep(time.Millisecond)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if !errors.Is(err, ErrClosed) {
			t.Fatalf("in-flight call: %v, want ErrClosed", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("Close did not interrupt the call in flight")
	}
	if err := c.Ping(long(t)); !errors.Is(err, ErrClosed) {
		t.Fatalf("call after close: %v, want ErrClosed", err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("second close: %v", err)
	}
}

// TestConcurrentCalls checks that answers pair with the right requests when
// many goroutines share a Client; run it with -race.
func TestConcurrentCalls(t *testing.T) {
	a := newFakeAgent(t)
	a.handle("echo", func(r fakeRequest) string {
		var args struct {
			N int `json:"n"`
		}
		json.Unmarshal(r.Arguments, &args)
		return ret(args.N)
	})
	c := a.dial(t)
	var wg sync.WaitGroup
	errs := make(chan error, 50)
	for i := range 50 {
		wg.Go(func() {
			var got int
			if err := c.Run(long(t), "echo", map[string]int{"n": i}, &got); err != nil {
				errs <- err
				return
			}
			if got != i {
				errs <- errors.New("answer paired with the wrong request")
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestUnsolicitedAnswerForcesResync(t *testing.T) {
	a := newFakeAgent(t)
	a.handle("guest-get-host-name", func(fakeRequest) string {
		// One answer too many, in the same write.
		return ret(map[string]string{"host-name": "right"}) + ret(map[string]string{"host-name": "stale"})
	})
	c := a.dial(t)
	for range 2 {
		name, err := c.HostName(long(t))
		if err != nil {
			t.Fatal(err)
		}
		if name != "right" {
			t.Fatalf("host name %q, want %q", name, "right")
		}
	}
}
