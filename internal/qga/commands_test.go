package qga

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"
)

// Answers recorded from qemu-ga 7.2 (Debian 1:7.2+dfsg-7+deb12u18).
const (
	realInfo       = `{"return": {"version": "7.2.22", "supported_commands": [{"enabled": true, "name": "guest-get-osinfo", "success-response": true}, {"enabled": false, "name": "guest-get-devices", "success-response": true}, {"enabled": true, "name": "guest-shutdown", "success-response": false}]}}` + "\n"
	realOSInfo     = `{"return": {"name": "Debian GNU/Linux", "kernel-release": "6.1.0-28-cloud-amd64", "version": "12 (bookworm)", "pretty-name": "Debian GNU/Linux 12 (bookworm)", "version-id": "12", "kernel-version": "#1 SMP PREEMPT_DYNAMIC Debian 6.1.119-1", "machine": "x86_64", "id": "debian"}}` + "\n"
	realHostName   = `{"return": {"host-name": "vm"}}` + "\n"
	realInterfaces = `{"return": [{"name": "lo", "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "127.0.0.1", "prefix": 8}, {"ip-address-type": "ipv6", "ip-address": "::1", "prefix": 128}], "statistics": {"tx-packets": 3, "tx-errs": 0, "rx-bytes": 2, "rx-dropped": 0, "rx-packets": 3, "rx-errs": 0, "tx-bytes": 2, "tx-dropped": 0}, "hardware-address": "00:00:00:00:00:00"}, {"name": "ifb0", "hardware-address": "0e:ca:62:60:68:e2"}]}` + "\n"
)

func TestTypedCommands(t *testing.T) {
	tests := []struct {
		name   string
		cmd    string
		answer string
		call   func(context.Context, *Client) (any, error)
		want   any
	}{
		{
			name: "ping", cmd: "guest-ping", answer: `{"return": {}}` + "\n",
			call: func(ctx context.Context, c *Client) (any, error) { return nil, c.Ping(ctx) },
		},
		{
			name: "info", cmd: "guest-info", answer: realInfo,
			call: func(ctx context.Context, c *Client) (any, error) { return c.Info(ctx) },
			want: Info{Version: "7.2.22", Commands: []CommandInfo{
				{Name: "guest-get-osinfo", Enabled: true, SuccessResponse: true},
				{Name: "guest-get-devices", Enabled: false, SuccessResponse: true},
				{Name: "guest-shutdown", Enabled: true, SuccessResponse: false},
			}},
		},
		{
			name: "os info", cmd: "guest-get-osinfo", answer: realOSInfo,
			call: func(ctx context.Context, c *Client) (any, error) { return c.OSInfo(ctx) },
			want: OSInfo{
				ID: "debian", Name: "Debian GNU/Linux", PrettyName: "Debian GNU/Linux 12 (bookworm)",
				Version: "12 (bookworm)", VersionID: "12", KernelRelease: "6.1.0-28-cloud-amd64",
				KernelVersion: "#1 SMP PREEMPT_DYNAMIC Debian 6.1.119-1", Machine: "x86_64",
			},
		},
		{
			name: "os info with fields missing", cmd: "guest-get-osinfo", answer: `{"return": {"kernel-release": "6.1"}}` + "\n",
			call: func(ctx context.Context, c *Client) (any, error) { return c.OSInfo(ctx) },
			want: OSInfo{KernelRelease: "6.1"},
		},
		{
			name: "host name", cmd: "guest-get-host-name", answer: realHostName,
			call: func(ctx context.Context, c *Client) (any, error) { return c.HostName(ctx) },
			want: "vm",
		},
		{
			name: "interfaces", cmd: "guest-network-get-interfaces", answer: realInterfaces,
			call: func(ctx context.Context, c *Client) (any, error) { return c.Interfaces(ctx) },
			want: []Interface{
				{Name: "lo", HardwareAddress: "00:00:00:00:00:00", IPAddresses: []IPAddress{
					{Type: "ipv4", Address: "127.0.0.1", Prefix: 8},
					{Type: "ipv6", Address: "::1", Prefix: 128},
				}},
				{Name: "ifb0", HardwareAddress: "0e:ca:62:60:68:e2"},
			},
		},
		{
			name: "freeze", cmd: "guest-fsfreeze-freeze", answer: ret(2),
			call: func(ctx context.Context, c *Client) (any, error) { return c.FSFreeze(ctx) },
			want: 2,
		},
		{
			name: "thaw", cmd: "guest-fsfreeze-thaw", answer: ret(2),
			call: func(ctx context.Context, c *Client) (any, error) { return c.FSThaw(ctx) },
			want: 2,
		},
		{
			name: "freeze status", cmd: "guest-fsfreeze-status", answer: ret("thawed"),
			call: func(ctx context.Context, c *Client) (any, error) { return c.FSFreezeStatus(ctx) },
			want: "thawed",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := newFakeAgent(t)
			a.handle(tt.cmd, func(fakeRequest) string { return tt.answer })
			c := a.dial(t)
			got, err := tt.call(long(t), c)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("got %#v\nwant %#v", got, tt.want)
			}
			if cmds := a.commands(); len(cmds) != 1 || cmds[0] != tt.cmd {
				t.Fatalf("agent received %v, want [%s]", cmds, tt.cmd)
			}
		})
	}
}

func TestInfoSupports(t *testing.T) {
	info := Info{Commands: []CommandInfo{{Name: "a", Enabled: true}, {Name: "b"}}}
	for name, want := range map[string]bool{"a": true, "b": false, "c": false} {
		if got := info.Supports(name); got != want {
			t.Errorf("Supports(%q) = %v, want %v", name, got, want)
		}
	}
}

// fakeFile serves guest-file-* commands for one file, handing out at most
// perRead bytes per guest-file-read like a pipe or a short read would.
type fakeFile struct {
	mu      sync.Mutex
	content []byte
	perRead int
	pos     int
	closed  bool
	// readAnswer, if set, replaces the answer to guest-file-read.
	readAnswer string
}

func (f *fakeFile) install(a *fakeAgent) {
	a.handle("guest-file-open", func(r fakeRequest) string {
		var args struct{ Path, Mode string }
		json.Unmarshal(r.Arguments, &args)
		if args.Path != "/file" {
			return agentError("GenericError", "failed to open file '"+args.Path+"' (mode: 'r'): No such file or directory")
		}
		if args.Mode != "r" {
			return agentError("GenericError", "wrong mode "+args.Mode)
		}
		return ret(1000)
	})
	a.handle("guest-file-read", func(r fakeRequest) string {
		f.mu.Lock()
		defer f.mu.Unlock()
		if f.readAnswer != "" {
			return f.readAnswer
		}
		var args struct{ Handle, Count int }
		json.Unmarshal(r.Arguments, &args)
		if args.Handle != 1000 || args.Count <= 0 {
			return agentError("GenericError", "bad read")
		}
		n := min(args.Count, f.perRead, len(f.content)-f.pos)
		chunk := f.content[f.pos : f.pos+n]
		f.pos += n
		return ret(map[string]any{
			"count":   n,
			"buf-b64": base64.StdEncoding.EncodeToString(chunk),
			"eof":     f.pos == len(f.content) && n < args.Count,
		})
	})
	a.handle("guest-file-close", func(r fakeRequest) string {
		f.mu.Lock()
		defer f.mu.Unlock()
		f.closed = true
		return ret(struct{}{})
	})
}

func TestReadFile(t *testing.T) {
	bootID := []byte("eca78a91-c92e-479e-bdb7-54aea3f95d50\n")
	tests := []struct {
		name       string
		path       string
		content    []byte
		perRead    int
		max        int
		readAnswer string
		want       []byte
		err        error // nil, ErrProtocol, or errAny
		agentErr   bool
		closed     bool // the handle must have been closed
	}{
		{name: "boot id", path: "/file", content: bootID, perRead: 4096, max: 64, want: bootID, closed: true},
		{name: "short reads", path: "/file", content: bootID, perRead: 5, max: 64, want: bootID, closed: true},
		{name: "exactly max", path: "/file", content: bootID, perRead: 7, max: len(bootID), want: bootID, closed: true},
		{name: "empty file", path: "/file", content: nil, perRead: 10, max: 64, want: []byte{}, closed: true},
		{name: "longer than max", path: "/file", content: bootID, perRead: 4096, max: 10, err: errAny, closed: true},
		{name: "missing file", path: "/nope", max: 64, agentErr: true},
		{
			name: "more than asked for", path: "/file", max: 4,
			readAnswer: ret(map[string]any{"count": 9, "buf-b64": "YWJjZGVmZ2hp", "eof": true}),
			err:        ErrProtocol, closed: true,
		},
		{
			name: "count does not match data", path: "/file", max: 64,
			readAnswer: ret(map[string]any{"count": 2, "buf-b64": "YWJj", "eof": true}),
			err:        ErrProtocol, closed: true,
		},
		{
			name: "bad base64", path: "/file", max: 64,
			readAnswer: ret(map[string]any{"count": 3, "buf-b64": "!!!!", "eof": true}),
			err:        ErrProtocol, closed: true,
		},
		{name: "negative max", path: "/file", max: -1, err: errAny},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := newFakeAgent(t)
			f := &fakeFile{content: tt.content, perRead: tt.perRead, readAnswer: tt.readAnswer}
			f.install(a)
			c := a.dial(t)
			got, err := c.ReadFile(long(t), tt.path, tt.max)
			var agentErr *Error
			switch {
			case tt.agentErr:
				if !errors.As(err, &agentErr) {
					t.Fatalf("err = %v, want an agent error", err)
				}
			case tt.err == errAny:
				if err == nil {
					t.Fatal("no error")
				}
			case tt.err != nil:
				if !errors.Is(err, tt.err) {
					t.Fatalf("err = %v, want %v", err, tt.err)
				}
			case err != nil:
				t.Fatal(err)
			case !bytes.Equal(got, tt.want):
				t.Fatalf("got %q, want %q", got, tt.want)
			}
			if err != nil && !strings.HasPrefix(err.Error(), "qga: read "+tt.path+": ") {
				t.Errorf("error %q does not name the file", err)
			}
			if f.closed != tt.closed {
				t.Fatalf("handle closed = %v, want %v", f.closed, tt.closed)
			}
		})
	}
}

// errAny in a test table means "some error".
var errAny = errors.New("any error")

// fakeProcess serves guest-exec and guest-exec-status for one process that
// exits after a number of polls.
type fakeProcess struct {
	polls   int    // status answers with exited=false before the exit
	status  string // the final status answer
	execErr string

	mu   sync.Mutex
	seen int
	req  fakeRequest
}

func (p *fakeProcess) install(a *fakeAgent) {
	a.handle("guest-exec", func(r fakeRequest) string {
		p.mu.Lock()
		defer p.mu.Unlock()
		p.req = r
		if p.execErr != "" {
			return p.execErr
		}
		return ret(map[string]int{"pid": 4242})
	})
	a.handle("guest-exec-status", func(r fakeRequest) string {
		p.mu.Lock()
		defer p.mu.Unlock()
		var args struct{ PID int }
		json.Unmarshal(r.Arguments, &args)
		if args.PID != 4242 {
			return agentError("GenericError", "Invalid parameter 'pid'")
		}
		p.seen++
		if p.seen <= p.polls {
			return ret(map[string]bool{"exited": false})
		}
		return p.status
	})
}

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

func TestExec(t *testing.T) {
	tests := []struct {
		name      string
		polls     int
		status    string
		execErr   string
		maxOutput int
		ctx       func(*testing.T) context.Context
		want      ExecResult
		err       error
		agentErr  bool
	}{
		{
			name:   "exit status and output after a few polls",
			polls:  3,
			status: `{"return": {"exitcode": 3, "err-data": "ZXJyCg==", "out-data": "aGkK", "err-truncated": false, "out-truncated": false, "exited": true}}` + "\n",
			want:   ExecResult{ExitCode: 3, Stdout: []byte("hi\n"), Stderr: []byte("err\n")},
		},
		{
			name:   "no output",
			status: `{"return": {"exitcode": 0, "exited": true}}` + "\n",
			want:   ExecResult{Stdout: []byte{}, Stderr: []byte{}},
		},
		{
			name:   "killed by a signal",
			status: `{"return": {"signal": 9, "exited": true}}` + "\n",
			want:   ExecResult{ExitCode: -1, Signal: 9, Stdout: []byte{}, Stderr: []byte{}},
		},
		{
			name:      "output capped at maxOutput",
			status:    ret(map[string]any{"exited": true, "exitcode": 0, "out-data": b64("0123456789"), "err-data": b64("abc")}),
			maxOutput: 4,
			want:      ExecResult{Stdout: []byte("0123"), Stderr: []byte("abc"), Truncated: true},
		},
		{
			name:      "cap not hit",
			status:    ret(map[string]any{"exited": true, "exitcode": 0, "out-data": b64("0123456789")}),
			maxOutput: 10,
			want:      ExecResult{Stdout: []byte("0123456789"), Stderr: []byte{}},
		},
		{
			name:   "agent truncated the output",
			status: ret(map[string]any{"exited": true, "exitcode": 0, "out-data": b64("x"), "out-truncated": true}),
			want:   ExecResult{Stdout: []byte("x"), Stderr: []byte{}, Truncated: true},
		},
		{
			name:    "program not found",
			execErr: agentError("GenericError", "Guest agent command failed, error was 'Failed to execute child process \u201c/nope\u201d (No such file or directory)'"),
			// guest-exec-status is never reached.
			agentErr: true,
		},
		{
			name:   "bad base64",
			status: ret(map[string]any{"exited": true, "exitcode": 0, "out-data": "%%%"}),
			err:    ErrProtocol,
		},
		{
			name:   "still running when ctx ends",
			polls:  1 << 30,
			status: ret(map[string]any{"exited": true}),
			ctx:    short,
			err:    context.DeadlineExceeded,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := newFakeAgent(t)
			p := &fakeProcess{polls: tt.polls, status: tt.status, execErr: tt.execErr}
			p.install(a)
			c := a.dial(t)
			ctx := long(t)
			if tt.ctx != nil {
				ctx = tt.ctx(t)
			}
			got, err := c.Exec(ctx, "/bin/sh", []string{"-c", "echo hi"}, []string{"A=b"}, []byte("input"), tt.maxOutput)
			var agentErr *Error
			switch {
			case tt.agentErr:
				if !errors.As(err, &agentErr) {
					t.Fatalf("err = %v, want an agent error", err)
				}
			case tt.err != nil:
				if !errors.Is(err, tt.err) {
					t.Fatalf("err = %v, want %v", err, tt.err)
				}
			case err != nil:
				t.Fatal(err)
			case !reflect.DeepEqual(got, tt.want):
				t.Fatalf("got %+v\nwant %+v", got, tt.want)
			}
			if err != nil && !strings.HasPrefix(err.Error(), "qga: exec /bin/sh: ") {
				t.Errorf("error %q does not name the program", err)
			}

			p.mu.Lock()
			defer p.mu.Unlock()
			var args struct {
				Path    string   `json:"path"`
				Arg     []string `json:"arg"`
				Env     []string `json:"env"`
				Input   string   `json:"input-data"`
				Capture bool     `json:"capture-output"`
			}
			if err := json.Unmarshal(p.req.Arguments, &args); err != nil {
				t.Fatal(err)
			}
			wantArgs := []string{"-c", "echo hi"}
			if args.Path != "/bin/sh" || !reflect.DeepEqual(args.Arg, wantArgs) || !reflect.DeepEqual(args.Env, []string{"A=b"}) ||
				args.Input != b64("input") || !args.Capture {
				t.Fatalf("guest-exec arguments %s", p.req.Arguments)
			}
			if tt.execErr == "" && tt.ctx == nil && p.seen != tt.polls+1 {
				t.Fatalf("%d status polls, want %d", p.seen, tt.polls+1)
			}
		})
	}
}

func TestExecOmitsEmptyOptionals(t *testing.T) {
	a := newFakeAgent(t)
	p := &fakeProcess{status: ret(map[string]any{"exited": true, "exitcode": 0})}
	p.install(a)
	c := a.dial(t)
	if _, err := c.Exec(long(t), "true", nil, nil, nil, 0); err != nil {
		t.Fatal(err)
	}
	var args map[string]any
	json.Unmarshal(p.req.Arguments, &args)
	want := map[string]any{"path": "true", "capture-output": true}
	if !reflect.DeepEqual(args, want) {
		t.Fatalf("guest-exec arguments %v, want %v", args, want)
	}
}

func TestShutdown(t *testing.T) {
	tests := []struct {
		name string
		mode string
		// answer is what the agent writes after guest-shutdown; sync
		// says whether it then still answers guest-sync-delimited.
		answer   string
		sync     bool
		agentErr bool
		// keepsConn: the agent moved on in step, so no redial follows.
		keepsConn bool
	}{
		{name: "agent goes quiet", mode: "powerdown"},
		{name: "agent moves on", sync: true, keepsConn: true},
		{name: "agent hangs up", answer: closeConn},
		{
			name: "agent refuses", mode: "reboot", answer: agentError("GenericError", "child process has failed to shutdown"),
			sync: true, agentErr: true,
		},
		{name: "stray return ignored", answer: ret(struct{}{}), sync: true, keepsConn: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := newFakeAgent(t)
			var mu sync.Mutex
			var shutdownArgs json.RawMessage
			down := false
			a.handle("guest-shutdown", func(r fakeRequest) string {
				mu.Lock()
				defer mu.Unlock()
				shutdownArgs = r.Arguments
				down = !tt.sync
				return tt.answer
			})
			a.handle("guest-sync-delimited", func(r fakeRequest) string {
				mu.Lock()
				defer mu.Unlock()
				if down {
					return ""
				}
				return syncHandler(r)
			})
			c := a.dial(t)
			// Only silence should make Shutdown wait out the grace
			// period; a long one shows that nothing else does.
			c.shutdownGrace = time.Minute
			if !tt.sync && tt.answer == "" {
				c.shutdownGrace = 200 * time.Millisecond
			}
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			start := time.Now()
			err := c.Shutdown(ctx, tt.mode)
			if d := time.Since(start); d > 30*time.Second {
				t.Errorf("Shutdown took %v", d)
			}
			var agentErr *Error
			switch {
			case tt.agentErr:
				if !errors.As(err, &agentErr) {
					t.Fatalf("err = %v, want an agent error", err)
				}
			case err != nil:
				t.Fatal(err)
			}

			mu.Lock()
			wantArgs := ""
			if tt.mode != "" {
				wantArgs = `{"mode":"` + tt.mode + `"}`
			}
			if string(shutdownArgs) != wantArgs {
				t.Errorf("shutdown arguments %s, want %s", shutdownArgs, wantArgs)
			}
			down = false // the guest came back
			mu.Unlock()
			if err := c.Ping(long(t)); err != nil {
				t.Fatalf("ping after shutdown: %v", err)
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

func TestShutdownHonoursEarlierDeadline(t *testing.T) {
	a := newFakeAgent(t)
	a.handle("guest-shutdown", func(fakeRequest) string { return "" })
	a.handle("guest-sync-delimited", func(r fakeRequest) string {
		if len(a.commands()) > 0 {
			return ""
		}
		return syncHandler(r)
	})
	c := a.dial(t)
	c.shutdownGrace = time.Minute
	start := time.Now()
	if err := c.Shutdown(short(t), ""); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("Shutdown took %v", d)
	}
}

// An answer to guest-exec-status that never comes costs one poll's time,
// not the whole exec: the next poll, on a fresh connection, gets the
// process's status (the agent keeps it until it is read).
func TestExecSurvivesALostStatusAnswer(t *testing.T) {
	a := newFakeAgent(t)
	p := &fakeProcess{polls: 3, status: ret(map[string]any{"exited": true, "exitcode": 0, "out-data": b64("done")})}
	p.install(a)
	status := a.handlers["guest-exec-status"]
	var mu sync.Mutex
	calls := 0
	a.handle("guest-exec-status", func(r fakeRequest) string {
		mu.Lock()
		calls++
		n := calls
		mu.Unlock()
		if n == 2 {
			return "" // lost: no answer at all
		}
		return status(r)
	})
	c := a.dial(t)
	c.timeout = 200 * time.Millisecond
	t0 := time.Now()
	got, err := c.Exec(long(t), "/bin/true", nil, nil, nil, 0)
	if err != nil {
		t.Fatalf("exec with one lost answer: %v", err)
	}
	if string(got.Stdout) != "done" {
		t.Fatalf("stdout %q", got.Stdout)
	}
	if c.LostAnswers() != 1 {
		t.Fatalf("%d lost answers counted, want 1", c.LostAnswers())
	}
	if d := time.Since(t0); d > 5*time.Second {
		t.Fatalf("exec took %s: a lost answer cost more than one poll's bound", d)
	}
	if a.connections() < 2 {
		t.Fatalf("%d connections: the poll after the lost answer did not reconnect", a.connections())
	}
}
