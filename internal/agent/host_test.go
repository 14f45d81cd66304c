package agent

import (
	"context"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/hostproto"
)

// fencedHost records what the joiner asks of the host.
type fencedHost struct {
	mu      sync.Mutex
	reasons []string
	cutOff  bool
	sweeps  int
}

func (h *fencedHost) HostInfo() api.Host             { return api.Host{Name: "h1"} }
func (h *fencedHost) Statuses() []hostproto.VMStatus { return nil }
func (h *fencedHost) Fence(reason string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.reasons = append(h.reasons, reason)
	return 1
}
func (h *fencedHost) SetCutOff(b bool) { h.mu.Lock(); h.cutOff = b; h.mu.Unlock() }
func (h *fencedHost) Sweep()           { h.mu.Lock(); h.sweeps++; h.mu.Unlock() }

func (h *fencedHost) state() ([]string, bool, int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]string(nil), h.reasons...), h.cutOff, h.sweeps
}

// Manager modes the fake manager answers heartbeats with.
const (
	answerOK   = "ok"
	answerDown = "down" // 503
	answerGone = "gone" // 410 until the host registers again
	answerSlow = "slow" // 204, but only after three fencing times
)

// TestJoinerFencing drives the host side of fencing against a fake manager:
// a host fences (and stays cut off) only when no heartbeat is accepted for
// the fencing time, a late answer does not count for the time it waited,
// and a host declared dead fences, sweeps and joins again.
func TestJoinerFencing(t *testing.T) {
	const fence = 300 * time.Millisecond
	tests := []struct {
		name       string
		script     []string // one mode per step of 2 fencing times
		wantFence  string   // substring of a fence reason; "" means no fence
		wantSweep  bool
		wantCutOff bool // at the end
	}{
		{"a manager that answers", []string{answerOK, answerOK}, "", false, false},
		{"no manager", []string{answerOK, answerDown}, "no manager answered", false, true},
		{"managers back", []string{answerDown, answerOK}, "no manager answered", false, false},
		{"declared dead", []string{answerOK, answerGone, answerOK}, "declared this host dead", true, false},
		{"answers too late count as silence", []string{answerOK, answerSlow, answerSlow}, "no manager answered", false, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var mode atomic.Value
			mode.Store(tt.script[0])
			var registers atomic.Int32
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if strings.HasSuffix(r.URL.Path, "/register") {
					registers.Add(1)
					if mode.Load() == answerGone {
						mode.Store(answerOK)
					}
					w.WriteHeader(http.StatusNoContent)
					return
				}
				switch mode.Load() {
				case answerDown:
					w.WriteHeader(http.StatusServiceUnavailable)
				case answerGone:
					w.WriteHeader(http.StatusGone)
				case answerSlow:
					time.Sleep(3 * fence)
					w.WriteHeader(http.StatusNoContent)
				default:
					w.WriteHeader(http.StatusNoContent)
				}
			}))
			defer srv.Close()
			host := &fencedHost{}
			j := &joiner{cfg: HostConfig{Name: "h1", Managers: []string{srv.URL}, FenceAfter: fence},
				log: slog.New(slog.DiscardHandler), addr: "127.0.0.1:1", host: host, interval: 50 * time.Millisecond,
				out: &outbox{wake: make(chan struct{}, 1)}, http: &http.Client{Timeout: 10 * fence}, lastAck: time.Now()}
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan struct{})
			go func() { defer close(done); j.watchdog(ctx) }()
			go j.run(ctx)
			for _, m := range tt.script {
				mode.Store(m)
				time.Sleep(2 * fence)
			}
			if tt.script[len(tt.script)-1] == answerOK {
				time.Sleep(2 * fence) // time to be heard again
			}
			cancel()
			<-done
			reasons, cutOff, sweeps := host.state()
			fenced := ""
			for _, r := range reasons {
				if tt.wantFence != "" && strings.Contains(r, tt.wantFence) {
					fenced = tt.wantFence
				}
			}
			switch {
			case tt.wantFence == "" && len(reasons) > 0:
				t.Fatalf("fenced without cause: %q", reasons)
			case tt.wantFence != "" && fenced == "":
				t.Fatalf("fence reasons %q, want one with %q", reasons, tt.wantFence)
			case cutOff != tt.wantCutOff:
				t.Fatalf("cut off = %v at the end, want %v", cutOff, tt.wantCutOff)
			case tt.wantSweep && (sweeps == 0 || registers.Load() < 2):
				t.Fatalf("declared dead: %d sweeps, %d registrations; want a sweep and a new registration", sweeps, registers.Load())
			}
		})
	}
}

// TestJoinerSwitchesManagersAtOnce: when the manager in use fails, the next
// one is tried at once, not a heartbeat interval later (a dead manager must
// not eat into the hosts' fencing time); with every manager failing, each
// is tried once per interval, no more.
func TestJoinerSwitchesManagersAtOnce(t *testing.T) {
	const interval = 500 * time.Millisecond
	var downOK atomic.Bool
	var beatsA, beatsB atomic.Int32
	var firstB atomic.Int64
	mk := func(beats *atomic.Int32, ok func() bool, first *atomic.Int64) *httptest.Server {
		return httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if strings.HasSuffix(r.URL.Path, "/register") {
				w.WriteHeader(http.StatusNoContent)
				return
			}
			beats.Add(1)
			if first != nil {
				first.CompareAndSwap(0, time.Now().UnixNano())
			}
			if !ok() {
				w.WriteHeader(http.StatusServiceUnavailable)
				return
			}
			w.WriteHeader(http.StatusNoContent)
		}))
	}
	a := mk(&beatsA, func() bool { return false }, nil) // the first manager is down
	defer a.Close()
	b := mk(&beatsB, func() bool { return !downOK.Load() }, &firstB)
	defer b.Close()
	j := &joiner{cfg: HostConfig{Name: "h1", Managers: []string{a.URL, b.URL}, FenceAfter: time.Minute},
		log: slog.New(slog.DiscardHandler), addr: "127.0.0.1:1", host: &fencedHost{}, interval: interval,
		out: &outbox{wake: make(chan struct{}, 1)}, http: &http.Client{Timeout: time.Second}, lastAck: time.Now()}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	t0 := time.Now()
	go j.run(ctx)
	for firstB.Load() == 0 && time.Since(t0) < 5*time.Second {
		time.Sleep(5 * time.Millisecond)
	}
	if got := time.Duration(firstB.Load() - t0.UnixNano()); firstB.Load() == 0 || got > interval/2 {
		t.Fatalf("the second manager had its first heartbeat %s after the first one failed; want at once (interval %s)", got, interval)
	}
	// Both down: each tried about once per interval, not in a loop.
	downOK.Store(true)
	time.Sleep(4 * interval)
	a0, b0 := beatsA.Load(), beatsB.Load()
	time.Sleep(4 * interval)
	if n := (beatsA.Load() - a0) + (beatsB.Load() - b0); n < 4 || n > 12 {
		t.Fatalf("%d heartbeats in 4 intervals with every manager down; want about 8 (each manager once an interval)", n)
	}
}
