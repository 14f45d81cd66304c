package hostagent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"testing"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/guestproto"
	"github.com/vigil-project/vigil/internal/hostproto"
)

func TestGuestGate(t *testing.T) {
	lim := guestLimits{readyEvery: 10 * time.Second, hbPerSecond: 4, hbBurst: 4, warnEvery: 10 * time.Second}
	type step struct {
		at      time.Duration // since the start
		boot    string
		process bool          // the heartbeat is processed
		report  bool          // guest-ready is reported at once
		later   time.Duration // a report is due this long from now
	}
	tests := []struct {
		name  string
		steps []step
	}{
		{"one heartbeat a second, one boot", []step{
			{0, "a", true, true, 0},
			{time.Second, "a", true, false, 0},
			{2 * time.Second, "a", true, false, 0},
		}},
		{"a reboot after the window is reported at once", []step{
			{0, "a", true, true, 0},
			{time.Second, "a", true, false, 0},
			{30 * time.Second, "b", true, true, 0},
			{31 * time.Second, "b", true, false, 0},
		}},
		{"a reboot inside the window is reported when it ends", []step{
			{0, "a", true, true, 0},
			{3 * time.Second, "b", true, false, 7 * time.Second},
			{4 * time.Second, "c", true, false, 0}, // the report already due covers it
		}},
		{"heartbeats beyond the rate are ignored", []step{
			{0, "a", true, true, 0},
			{time.Millisecond, "b", true, false, 10*time.Second - time.Millisecond},
			{2 * time.Millisecond, "c", true, false, 0},
			{3 * time.Millisecond, "d", true, false, 0},
			{4 * time.Millisecond, "e", false, false, 0},
			{5 * time.Millisecond, "f", false, false, 0},
			{255 * time.Millisecond, "g", true, false, 0}, // a quarter second buys one
			{256 * time.Millisecond, "h", false, false, 0},
		}},
	}
	t0 := time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g := newGuestGate(lim)
			for i, s := range tt.steps {
				now := t0.Add(s.at)
				ok, _ := g.allow(now)
				if ok != s.process {
					t.Fatalf("step %d: processed = %v, want %v", i, ok, s.process)
				}
				if !ok {
					continue
				}
				report, later := g.boot(now, s.boot, uint64(i+1))
				if report != s.report || later != s.later {
					t.Fatalf("step %d: boot(%s) = %v, %v; want %v, %v", i, s.boot, report, later, s.report, s.later)
				}
			}
		})
	}
}

// fakeGuest is the guest end of a VM's agent socket: it sends what the
// test tells it to and, unless mute, answers exec requests with "done".
type fakeGuest struct {
	enc  *guestproto.Encoder
	mute bool
}

// startFakeGuest listens on v's agent socket, as QEMU does, and starts
// watching it as attach does.
func startFakeGuest(t *testing.T, v *vm, mute bool) *fakeGuest {
	t.Helper()
	if err := os.MkdirAll(v.machine.Dir, 0o755); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("unix", v.machine.AgentSocket())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	linked := make(chan struct{})
	go func() { defer close(done); v.watchGuest(ctx, newGuestGate(v.agent.limitsForGuest()), linked) }()
	conn, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	// Held: a restored guest may run now.
	select {
	case <-linked:
	case <-time.After(5 * time.Second):
		t.Fatal("the channel was connected but not said so")
	}
	t.Cleanup(func() {
		cancel()
		conn.Close()
		ln.Close()
		<-done
	})
	g := &fakeGuest{enc: guestproto.NewEncoder(conn), mute: mute}
	go func() {
		dec := guestproto.NewDecoder(conn)
		for {
			m, err := dec.Decode()
			if err != nil {
				return
			}
			if m.Type == guestproto.TypeExec && !g.mute {
				g.enc.Encode(guestproto.Message{Type: guestproto.TypeExecResult, ID: m.ID, ExecResult: &guestproto.ExecResult{Output: "done"}})
			}
		}
	}()
	return g
}

func (g *fakeGuest) heartbeat(t *testing.T, boot string, seq uint64) {
	t.Helper()
	if err := g.enc.Encode(guestproto.Message{Type: guestproto.TypeHeartbeat, Heartbeat: &guestproto.Heartbeat{BootID: boot, Seq: seq}}); err != nil {
		t.Fatal(err)
	}
}

// roundTrip returns once the host has read everything the guest sent so far:
// the answer to an exec comes after it on the same stream.
func roundTrip(t *testing.T, v *vm) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for {
		_, err := v.request(ctx, guestproto.Message{Type: guestproto.TypeExec, Exec: &guestproto.Exec{Command: "true"}})
		if err == nil {
			return
		}
		if ctx.Err() != nil {
			t.Fatalf("no round trip to the fake guest: %v", err)
		}
		time.Sleep(10 * time.Millisecond) // not connected yet
	}
}

func bootOf(t *testing.T, e hostproto.Event) string {
	t.Helper()
	var m struct {
		BootID string `json:"boot_id"`
	}
	if err := json.Unmarshal([]byte(e.Message), &m); err != nil {
		t.Fatalf("guest-ready message %q: %v", e.Message, err)
	}
	return m.BootID
}

// TestGuestFloodIsBounded: a guest that sends a new boot id with every
// heartbeat, as fast as it can, gets one guest-ready per window and its
// excess heartbeats ignored; a guest that behaves is reported as before.
func TestGuestFloodIsBounded(t *testing.T) {
	a, rec := newBareAgent(t)
	const window = 400 * time.Millisecond
	a.guestLimits = guestLimits{readyEvery: window, hbPerSecond: 4, hbBurst: 4, warnEvery: time.Minute}
	v := a.newVM(spec("web1", 64<<20))
	g := startFakeGuest(t, v, false)
	roundTrip(t, v)

	start := time.Now()
	for i := range 200 {
		g.heartbeat(t, fmt.Sprintf("boot-%d", i), uint64(i+1))
	}
	roundTrip(t, v)
	if time.Since(start) > window/2 {
		t.Skip("machine too slow for this test's timing")
	}
	ready := rec.of(hostproto.EventGuestReady)
	if len(ready) != 1 || bootOf(t, ready[0]) != "boot-0" {
		t.Fatalf("%d guest-ready events during the flood, want one for boot-0", len(ready))
	}
	v.mu.Lock()
	seq, latest := v.guest.Seq, v.guest.BootID
	v.mu.Unlock()
	if seq > 5 {
		t.Fatalf("heartbeat %d was processed: the guest's excess was not ignored", seq)
	}
	if n := rec.logged("guest agent exceeds its heartbeat rate"); n != 1 {
		t.Fatalf("the excess was logged %d times, want once", n)
	}

	// At the end of the window the latest boot id is reported.
	waitUntil(t, func() bool { return len(rec.of(hostproto.EventGuestReady)) == 2 })
	if got := bootOf(t, rec.of(hostproto.EventGuestReady)[1]); got != latest {
		t.Fatalf("coalesced guest-ready names %s, want the latest boot %s", got, latest)
	}

	// A guest that behaves again: its next reboot is reported at once.
	time.Sleep(window + 100*time.Millisecond)
	g.heartbeat(t, "rebooted", 1)
	roundTrip(t, v)
	ready = rec.of(hostproto.EventGuestReady)
	if len(ready) != 3 || bootOf(t, ready[2]) != "rebooted" {
		t.Fatalf("a reboot after the window: %d guest-ready events, want 3 with the last for the new boot", len(ready))
	}
	v.mu.Lock()
	if v.guest.BootID != "rebooted" {
		t.Fatalf("recorded boot %s after the reboot", v.guest.BootID)
	}
	v.mu.Unlock()
}

// TestExecDeadline: an exec to a guest that never answers ends with a
// deadline error, even when the caller's context has none.
func TestExecDeadline(t *testing.T) {
	const grace = 300 * time.Millisecond
	tests := []struct {
		name    string
		req     api.ExecRequest
		ctx     time.Duration // the caller's deadline; 0: none
		atLeast time.Duration
		atMost  time.Duration
	}{
		{"foreground waits for its timeout and a margin", api.ExecRequest{Command: "sleep 9", TimeoutSeconds: 1}, 0, time.Second, time.Second + 3*grace},
		{"background answers at once", api.ExecRequest{Command: "sleep 9", Background: true}, 0, grace / 2, 3 * grace},
		{"a shorter caller deadline wins", api.ExecRequest{Command: "sleep 9", TimeoutSeconds: 1}, grace / 2, grace / 4, 2 * grace},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, _ := newBareAgent(t)
			a.execGrace = grace
			v := a.newVM(spec("web1", 64<<20))
			a.vms["web1"] = v
			startFakeGuest(t, v, true)
			waitUntil(t, func() bool { v.mu.Lock(); defer v.mu.Unlock(); return v.guestEnc != nil })

			ctx := context.Background()
			if tt.ctx > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, tt.ctx)
				defer cancel()
			}
			start := time.Now()
			errc := make(chan error, 1)
			go func() {
				_, err := a.Exec(ctx, hostproto.ExecRequest{VM: "web1", Exec: tt.req})
				errc <- err
			}()
			select {
			case err := <-errc:
				took := time.Since(start)
				if !errors.Is(err, context.DeadlineExceeded) {
					t.Fatalf("exec to a silent guest: %v, want a deadline error", err)
				}
				if took < tt.atLeast || took > tt.atMost {
					t.Fatalf("gave up after %v, want between %v and %v", took, tt.atLeast, tt.atMost)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("exec to a silent guest hangs")
			}
		})
	}
}

func TestExecDeadlineDefaults(t *testing.T) {
	tests := []struct {
		req  api.ExecRequest
		want time.Duration
	}{
		{api.ExecRequest{}, 30*time.Second + defaultExecGrace},
		{api.ExecRequest{TimeoutSeconds: 5}, 5*time.Second + defaultExecGrace},
		{api.ExecRequest{TimeoutSeconds: -3}, 30*time.Second + defaultExecGrace},
		{api.ExecRequest{TimeoutSeconds: 1 << 62}, maxExecTimeout + defaultExecGrace},
		{api.ExecRequest{TimeoutSeconds: 600, Background: true}, defaultExecGrace},
	}
	a := &Agent{}
	for _, tt := range tests {
		if got := a.execDeadline(tt.req); got != tt.want {
			t.Errorf("execDeadline(%+v) = %v, want %v", tt.req, got, tt.want)
		}
	}
}
