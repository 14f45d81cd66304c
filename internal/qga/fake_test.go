package qga

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeAgent plays qemu-ga (or QEMU's chardev in front of it) on a unix
// socket. Like the real agent it keeps its parser state across client
// connections, answers a 0xFF byte with a parse error, and writes the
// answer to guest-sync-delimited behind a 0xFF. Handlers decide what every
// other command gets back, including nothing at all.
type fakeAgent struct {
	t    *testing.T
	path string
	ln   net.Listener
	wg   sync.WaitGroup

	mu       sync.Mutex
	handlers map[string]handler
	// onConnect, if set, returns bytes written to each new connection
	// before anything is read: stale answers and garbage.
	onConnect func() string
	// halfLine means the agent's parser holds a half-read request left by
	// an earlier client: everything is swallowed until a 0xFF arrives.
	halfLine  bool
	requests  []fakeRequest
	conns     int
	sentinels int
	open      []net.Conn
}

type fakeRequest struct {
	Execute   string          `json:"execute"`
	Arguments json.RawMessage `json:"arguments"`
}

// A handler returns what the agent writes in answer to one request:
// "" for silence, closeConn to hang up, or lines of text (followed by
// closeAfter to hang up after writing them).
type handler func(req fakeRequest) string

const (
	closeConn  = "\x00close"
	closeAfter = "\x00close-after"
)

func ret(v any) string {
	b, err := json.Marshal(map[string]any{"return": v})
	if err != nil {
		panic(err)
	}
	return string(b) + "\n"
}

func agentError(class, desc string) string {
	return fmt.Sprintf(`{"error": {"class": %q, "desc": %q}}`+"\n", class, desc)
}

func newFakeAgent(t *testing.T) *fakeAgent {
	t.Helper()
	path := filepath.Join(t.TempDir(), "qga.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	a := &fakeAgent{t: t, path: path, ln: ln, handlers: map[string]handler{
		"guest-sync-delimited": syncHandler,
		"guest-ping":           func(fakeRequest) string { return ret(struct{}{}) },
	}}
	a.wg.Add(1)
	go a.accept()
	t.Cleanup(func() {
		ln.Close()
		a.mu.Lock()
		for _, c := range a.open {
			c.Close()
		}
		a.mu.Unlock()
		a.wg.Wait()
	})
	return a
}

func syncHandler(req fakeRequest) string {
	var args struct {
		ID int64 `json:"id"`
	}
	if err := json.Unmarshal(req.Arguments, &args); err != nil {
		return agentError("GenericError", "bad id")
	}
	return "\xff" + ret(args.ID)
}

// set changes the agent's behaviour under its lock.
func (a *fakeAgent) set(f func(a *fakeAgent)) {
	a.mu.Lock()
	defer a.mu.Unlock()
	f(a)
}

func (a *fakeAgent) sentinelCount() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.sentinels
}

func (a *fakeAgent) handle(cmd string, h handler) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.handlers[cmd] = h
}

// log returns the commands received so far, sync included.
func (a *fakeAgent) log() []fakeRequest {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]fakeRequest(nil), a.requests...)
}

// commands returns the names of the commands received, without syncs.
func (a *fakeAgent) commands() []string {
	var names []string
	for _, r := range a.log() {
		if r.Execute != "guest-sync-delimited" {
			names = append(names, r.Execute)
		}
	}
	return names
}

func (a *fakeAgent) connections() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.conns
}

func (a *fakeAgent) accept() {
	defer a.wg.Done()
	for {
		nc, err := a.ln.Accept()
		if err != nil {
			return
		}
		a.mu.Lock()
		a.conns++
		a.open = append(a.open, nc)
		a.mu.Unlock()
		a.wg.Add(1)
		go a.serve(nc)
	}
}

func (a *fakeAgent) serve(nc net.Conn) {
	defer a.wg.Done()
	defer nc.Close()
	a.mu.Lock()
	onConnect := a.onConnect
	a.mu.Unlock()
	if onConnect != nil {
		if _, err := nc.Write([]byte(onConnect())); err != nil {
			return
		}
	}
	r := bufio.NewReader(nc)
	for {
		line, err := r.ReadBytes('\n')
		if err != nil {
			return
		}
		a.mu.Lock()
		if i := bytes.LastIndexByte(line, 0xFF); i >= 0 {
			// The real agent's lexer resets on 0xFF and reports it.
			line = line[i+1:]
			a.halfLine = false
			a.sentinels++
			a.mu.Unlock()
			if _, err := nc.Write([]byte(agentError("GenericError", "JSON parse error, stray '\\uFFFD'"))); err != nil {
				return
			}
			a.mu.Lock()
		}
		if a.halfLine {
			a.mu.Unlock()
			continue
		}
		var req fakeRequest
		if err := json.Unmarshal(line, &req); err != nil {
			a.mu.Unlock()
			nc.Write([]byte(agentError("GenericError", "JSON parse error")))
			continue
		}
		a.requests = append(a.requests, req)
		h := a.handlers[req.Execute]
		a.mu.Unlock()

		out := agentError("CommandNotFound", "The command "+req.Execute+" has not been found")
		if h != nil {
			out = h(req)
		}
		if out == closeConn {
			return
		}
		out, hangUp := strings.CutSuffix(out, closeAfter)
		if _, err := nc.Write([]byte(out)); err != nil || hangUp {
			return
		}
	}
}

// dial connects a Client to a with test-friendly timings.
func (a *fakeAgent) dial(t *testing.T) *Client {
	t.Helper()
	c, err := Dial(long(t), a.path)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	c.poll = 5 * time.Millisecond
	t.Cleanup(func() { c.Close() })
	return c
}

// short returns a context for calls that are expected to time out.
func short(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 150*time.Millisecond)
	t.Cleanup(cancel)
	return ctx
}

// long returns a context for calls that are expected to succeed; its
// deadline only stops a broken test from hanging, so it is generous enough
// for a loaded machine running the race detector.
func long(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}
