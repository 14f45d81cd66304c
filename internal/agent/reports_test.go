package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/hostproto"
)

func reportWith(running bool, cpu float64) hostproto.Heartbeat {
	return hostproto.Heartbeat{Info: api.Host{Name: "h1", CPUs: 4},
		Statuses: []hostproto.VMStatus{{Name: "a", Running: running, Usage: &hostproto.VMUsage{CPUSeconds: cpu},
			Guest: &api.GuestInfo{BootID: "b1", Seq: uint64(cpu)}}}}
}

func protected(hb hostproto.Heartbeat) hostproto.Heartbeat {
	hb.Statuses[0].Protection = &hostproto.ProtectionStatus{Secondary: "h2", State: "protected"}
	return hb
}

// TestReports: a heartbeat says Same only to the manager that took the
// last full report, which said it takes Same, within FullReportEvery and
// while nothing a decision reads changed; every full report has a new
// number.
func TestReports(t *testing.T) {
	const a, b = "https://m1", "https://m2"
	t0 := time.Unix(1000, 0)
	var r reports
	first := r.next(a, reportWith(true, 1), t0)
	if first.Same != 0 || first.Report == 0 || len(first.Statuses) != 1 {
		t.Fatalf("first heartbeat: %+v, want a numbered full report", first)
	}
	if hb := r.next(a, reportWith(true, 1), t0); hb.Same != 0 || hb.Report != first.Report+1 {
		t.Fatalf("before any manager took a report: %+v, want full report %d", hb, first.Report+1)
	}
	r.took(a, first, t0, true)
	steps := []struct {
		name     string
		url      string
		report   hostproto.Heartbeat
		after    time.Duration
		wantSame bool
	}{
		{"counters moved", a, reportWith(true, 2), time.Second, true},
		{"a vm stopped", a, reportWith(false, 2), time.Second, false},
		{"another manager", b, reportWith(true, 2), time.Second, false},
		{"full report due", a, reportWith(true, 2), hostproto.FullReportEvery, false},
	}
	for _, st := range steps {
		hb := r.next(st.url, st.report, t0.Add(st.after))
		switch {
		case st.wantSame && (hb.Same != first.Report || hb.Statuses != nil || hb.Report != 0 ||
			len(hb.Guests) != 1 || hb.Guests[0].Seq != st.report.Statuses[0].Guest.Seq):
			t.Errorf("%s: %+v, want Same %d with the guest's counters and no statuses", st.name, hb, first.Report)
		case !st.wantSame && (hb.Same != 0 || hb.Report <= first.Report || len(hb.Statuses) != 1):
			t.Errorf("%s: %+v, want a new full report", st.name, hb)
		}
	}
	// A manager that does not say it takes Same gets full reports only.
	var old reports
	hb := old.next(a, reportWith(true, 1), t0)
	old.took(a, hb, t0, false)
	if hb := old.next(a, reportWith(true, 1), t0.Add(time.Second)); hb.Same != 0 {
		t.Fatalf("sent Same to a manager that did not say it takes it: %+v", hb)
	}
	// A host with a protected VM reports in full, changed or not: the
	// checkpoint figures are the VM's recovery point.
	var p reports
	hb = p.next(a, protected(reportWith(true, 1)), t0)
	p.took(a, hb, t0, true)
	if hb := p.next(a, protected(reportWith(true, 1)), t0.Add(time.Second)); hb.Same != 0 {
		t.Fatalf("sent Same with a protected vm: %+v", hb)
	}
	// Forgotten (a registration, a 409): full again.
	r.forget()
	if hb := r.next(a, reportWith(true, 2), t0.Add(time.Second)); hb.Same != 0 {
		t.Fatalf("after forget: %+v", hb)
	}
}

// TestJoinerSendsSameAndRecovers drives the heartbeat loop against a fake
// manager that keeps only the last report it took and forgets it on
// demand (as a restarted manager does): the host sends its statuses once,
// then Same; when the manager answers 409 the host sends them in full at
// once, in the same beat; it never sends Same for a report the manager
// did not take.
func TestJoinerSendsSameAndRecovers(t *testing.T) {
	var mu sync.Mutex
	var held uint64
	var full, same, conflicts, olds int
	var old bool // the manager is replaced by one of before Same
	var bad []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasSuffix(r.URL.Path, "/register") {
			w.WriteHeader(http.StatusNoContent)
			return
		}
		var hb hostproto.Heartbeat
		if err := json.NewDecoder(r.Body).Decode(&hb); err != nil {
			t.Error(err)
		}
		mu.Lock()
		defer mu.Unlock()
		if (hb.Same != 0) != strings.HasSuffix(r.URL.Path, "/heartbeat/same") {
			bad = append(bad, fmt.Sprintf("Same %d sent to %s", hb.Same, r.URL.Path))
		}
		if old && hb.Same != 0 { // a manager of before Same: no such route
			olds++
			w.WriteHeader(http.StatusNotFound)
			return
		}
		switch {
		case hb.Same != 0 && hb.Same != held:
			conflicts++
			if held != 0 {
				bad = append(bad, "Same for a report the manager did not take")
			}
			w.WriteHeader(http.StatusConflict)
			return
		case hb.Same != 0:
			same++
		case hb.Report == 0 || len(hb.Statuses) != 1:
			bad = append(bad, "a full report without a number or statuses")
		default:
			full++
			held = hb.Report
		}
		if !old {
			w.Header().Set(hostproto.ReportsHeader, hostproto.ReportsSame)
		}
		w.WriteHeader(http.StatusNoContent)
	}))
	defer srv.Close()
	host := &reportingHost{}
	j := &joiner{cfg: HostConfig{Name: "h1", Managers: []string{srv.URL}, FenceAfter: time.Minute},
		log: slog.New(slog.DiscardHandler), addr: "127.0.0.1:1", host: host, interval: 20 * time.Millisecond,
		out: &outbox{wake: make(chan struct{}, 1)}, http: &http.Client{Timeout: time.Second}, lastAck: time.Now()}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go j.run(ctx)
	counts := func() (int, int, int) {
		mu.Lock()
		defer mu.Unlock()
		return full, same, conflicts
	}
	waitFor := func(what string, ok func(full, same, conflicts int) bool) {
		t.Helper()
		for t0 := time.Now(); !ok(counts()); time.Sleep(5 * time.Millisecond) {
			if time.Since(t0) > 5*time.Second {
				f, s, c := counts()
				t.Fatalf("%s: %d full, %d same, %d conflicts", what, f, s, c)
			}
		}
	}
	waitFor("steady beats say Same", func(f, s, _ int) bool { return f == 1 && s >= 10 })
	mu.Lock()
	held = 0 // the manager restarts
	mu.Unlock()
	waitFor("the full report sent again", func(f, s, c int) bool { return f == 2 && c == 1 })
	_, s0, _ := counts()
	waitFor("Same again", func(f, s, _ int) bool { return f == 2 && s >= s0+5 })
	host.stop()
	waitFor("a change reported in full", func(f, _, _ int) bool { return f == 3 })
	// Rolled back to a manager of before Same: at most one Same reaches it
	// (a 404, then the report in full at once), then full reports only.
	mu.Lock()
	old = true
	mu.Unlock()
	waitFor("full reports to the old manager", func(f, _, _ int) bool { return f >= 10 })
	cancel()
	mu.Lock()
	defer mu.Unlock()
	if olds > 1 {
		t.Errorf("%d Same heartbeats reached a manager that does not take them; want at most one", olds)
	}
	if len(bad) > 0 {
		t.Fatal(bad)
	}
}

// reportingHost is a host with one VM that can stop.
type reportingHost struct {
	fencedHost
	stopped bool
	cpu     float64
}

func (h *reportingHost) stop() { h.mu.Lock(); h.stopped = true; h.mu.Unlock() }

func (h *reportingHost) Statuses() []hostproto.VMStatus {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.cpu++
	return []hostproto.VMStatus{{Name: "a", Running: !h.stopped, Usage: &hostproto.VMUsage{CPUSeconds: h.cpu}}}
}
