package manager

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/hostproto"
	"github.com/vigil-project/vigil/internal/remotehost"
)

// reportOf is a host's report with one running VM, changed by mut.
func reportOf(mut func(*hostproto.Heartbeat)) hostproto.Heartbeat {
	hb := hostproto.Heartbeat{
		Info: api.Host{Name: "h0", Accel: "tcg", CPUs: 2, MemoryBytes: 8 << 30, QEMUVersion: "7.2", LastHeartbeat: time.Unix(100, 0), State: "up"},
		Statuses: []hostproto.VMStatus{{
			Name: "a", Running: true, PID: 10, RunState: "running", StartedAt: time.Unix(50, 0),
			Guest:      &api.GuestInfo{BootID: "b1", Seq: 7, UptimeSeconds: 3, LastHeartbeat: time.Unix(99, 0), Agent: "vigil", Addresses: []string{"10.0.0.2"}},
			Protection: &hostproto.ProtectionStatus{Secondary: "h1", Generation: 2, State: "protected", Seq: 4, CommittedAt: time.Unix(98, 0), PauseP99MS: 12},
			Usage:      &hostproto.VMUsage{CPUSeconds: 1.5, NetRxBytes: 100},
		}},
	}
	if mut != nil {
		mut(&hb)
	}
	return hb
}

// TestHeartbeatStoresStatusWhenItChanges: every heartbeat stores the host's
// liveness, its status only when a decision-relevant part changed or it
// grew old; another manager sees both.
func TestHeartbeatStoresStatusWhenItChanges(t *testing.T) {
	ms, _ := newTestManagers(t, 2)
	ctx := context.Background()
	for _, m := range ms {
		h := remotehost.New("h0", "127.0.0.1:1", m.identity.HostClientTLS("h0"))
		m.AddHost(h)
		wctx, cancel := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() { defer close(done); m.WatchHosts(wctx) }()
		t.Cleanup(func() { cancel(); <-done })
	}
	if err := ms[0].store.Put(ctx, "hosts/h0", hostRecord{Name: "h0", Addr: "127.0.0.1:1", FenceAfterMS: 5000}); err != nil {
		t.Fatal(err)
	}
	revs := func() (seen, status int64) {
		t.Helper()
		var s hostSeenRecord
		var st hostStatusRecord
		seen, err := ms[0].store.Get(ctx, "hostseen/h0", &s)
		if err != nil {
			t.Fatal(err)
		}
		status, err = ms[0].store.Get(ctx, "hoststatus/h0", &st)
		if err != nil {
			t.Fatal(err)
		}
		return seen, status
	}
	beat := func(hb hostproto.Heartbeat) {
		t.Helper()
		if err := ms[0].Heartbeat(ctx, "h0", hb); err != nil {
			t.Fatal(err)
		}
	}
	beat(reportOf(nil))
	seen1, status1 := revs()
	if seen1 != status1 {
		t.Fatalf("first heartbeat: liveness at %d, status at %d; want both", seen1, status1)
	}

	// Only counters moved: liveness stored, status not; this manager
	// has the new counters all the same.
	beat(reportOf(func(hb *hostproto.Heartbeat) { hb.Statuses[0].Usage = &hostproto.VMUsage{CPUSeconds: 42} }))
	seen2, status2 := revs()
	if seen2 <= seen1 || status2 != status1 {
		t.Fatalf("counters only: liveness %d→%d, status %d→%d; want liveness only", seen1, seen2, status1, status2)
	}
	if st, _ := ms[0].remote("h0").Status("a"); st.Usage == nil || st.Usage.CPUSeconds != 42 {
		t.Fatalf("the manager that took the heartbeat has usage %+v, want 42 s", st.Usage)
	}
	// The other manager hears of the liveness: the host is up there.
	waitFor(t, func() bool { return ms[1].hostSeenRev("h0") == seen2 })
	if st := ms[1].hostState("h0"); st != "up" {
		t.Fatalf("other manager: host %s", st)
	}

	// A VM stopped: status stored, and the other manager sees it.
	beat(reportOf(func(hb *hostproto.Heartbeat) { hb.Statuses[0].Running, hb.Statuses[0].RunState = false, "shutdown" }))
	seen3, status3 := revs()
	if status3 != seen3 || status3 <= status2 {
		t.Fatalf("vm stopped: liveness %d, status %d→%d; want the status stored", seen3, status2, status3)
	}
	waitFor(t, func() bool { st, ok := ms[1].remote("h0").Status("a"); return ok && !st.Running })

	// Nothing changed but the stored status is old: refreshed.
	ms[0].hosts.mu.Lock()
	ms[0].hosts.hosts["h0"].stored.at = time.Now().Add(-statusRefresh)
	ms[0].hosts.mu.Unlock()
	beat(reportOf(func(hb *hostproto.Heartbeat) { hb.Statuses[0].Running, hb.Statuses[0].RunState = false, "shutdown" }))
	if seen4, status4 := revs(); status4 != seen4 || status4 <= status3 {
		t.Fatalf("old status: liveness %d, status %d→%d; want it refreshed", seen4, status3, status4)
	}
}

// addLiveHost registers remote host h0 with a record that says it lives,
// and returns the record's revision.
func addLiveHost(t *testing.T, m *Manager) int64 {
	t.Helper()
	m.AddHost(remotehost.New("h0", "127.0.0.1:1", m.identity.HostClientTLS("h0")))
	rev, err := m.store.PutIf(context.Background(), "hosts/h0", hostRecord{Name: "h0", Addr: "127.0.0.1:1"}, "hosts/h0", 0)
	if err != nil {
		t.Fatal(err)
	}
	m.setLiveRecordRev("h0", rev)
	return rev
}

// TestHeartbeatAfterUnseenDeath: a death another manager stored, which this
// one has not seen yet, still refuses the heartbeat (the write is
// conditioned on the host's record) and stores nothing.
func TestHeartbeatAfterUnseenDeath(t *testing.T) {
	m, _ := newTestManager(t)
	ctx := context.Background()
	rev := addLiveHost(t, m)
	if err := m.Heartbeat(ctx, "h0", reportOf(nil)); err != nil {
		t.Fatal(err)
	}
	var seen hostSeenRecord
	before, err := m.store.Get(ctx, "hostseen/h0", &seen)
	if err != nil {
		t.Fatal(err)
	}
	dead := time.Now().UTC()
	if err := m.store.Put(ctx, "hosts/h0", hostRecord{Name: "h0", Addr: "127.0.0.1:1", DeadAt: &dead}); err != nil {
		t.Fatal(err)
	}
	m.setLiveRecordRev("h0", rev) // as if the watch had not delivered it yet
	if err := m.Heartbeat(ctx, "h0", reportOf(nil)); !errors.Is(err, ErrGone) {
		t.Fatalf("heartbeat after an unseen death: %v, want ErrGone", err)
	}
	if after, err := m.store.Get(ctx, "hostseen/h0", &seen); err != nil || after != before {
		t.Fatalf("liveness rev %d→%d (%v): a dead host's heartbeat was stored", before, after, err)
	}
}

// TestDeathRevisionNeverConditionsAHeartbeat: once the watch has shown a
// host's death, no heartbeat can be stored on the strength of that record
// (the race: a heartbeat past the in-memory check as the death arrives).
func TestDeathRevisionNeverConditionsAHeartbeat(t *testing.T) {
	m, _ := newTestManager(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); m.WatchHosts(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	m.AddHost(remotehost.New("h0", "127.0.0.1:1", m.identity.HostClientTLS("h0")))
	if err := m.store.Put(ctx, "hosts/h0", hostRecordOf("h0", nil)); err != nil {
		t.Fatal(err)
	}
	if err := m.Heartbeat(ctx, "h0", reportOf(nil)); err != nil {
		t.Fatal(err)
	}
	dead := time.Now().UTC()
	if err := m.store.Put(ctx, "hosts/h0", hostRecordOf("h0", &dead)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return m.hostState("h0") == "dead" })
	if rev := m.hostRecordRev("h0"); rev != 0 {
		t.Fatalf("a dead host's record revision %d is offered to heartbeats", rev)
	}
	m.hosts.mu.Lock()
	m.hosts.hosts["h0"].deadAt = time.Time{} // as if the death were not applied yet
	m.hosts.mu.Unlock()
	_, _, err := m.shareHeartbeat(ctx, "h0", reportOf(nil), time.Now())
	var de *deadError
	if !errors.As(err, &de) {
		t.Fatalf("heartbeat stored after the death: %v", err)
	}
}

// TestStatusStoredElsewhereIsReplaced: a manager that stored a host's
// status, then lost the host to another manager for a heartbeat (which
// stored another status), stores its report again even though it matches
// what it stored itself.
func TestStatusStoredElsewhereIsReplaced(t *testing.T) {
	ms, _ := newTestManagers(t, 2)
	ctx := context.Background()
	for _, m := range ms { // no watch: the first manager does not see the second's write
		m.AddHost(remotehost.New("h0", "127.0.0.1:1", m.identity.HostClientTLS("h0")))
	}
	if err := ms[0].store.Put(ctx, "hosts/h0", hostRecordOf("h0", nil)); err != nil {
		t.Fatal(err)
	}
	running := reportOf(nil)
	paused := reportOf(func(hb *hostproto.Heartbeat) { hb.Statuses[0].RunState = "paused" })
	for _, step := range []struct {
		m  *Manager
		hb hostproto.Heartbeat
	}{{ms[0], running}, {ms[0], running}, {ms[1], paused}, {ms[0], running}} {
		if err := step.m.Heartbeat(ctx, "h0", step.hb); err != nil {
			t.Fatal(err)
		}
	}
	var st hostStatusRecord
	if _, err := ms[0].store.Get(ctx, "hoststatus/h0", &st); err != nil {
		t.Fatal(err)
	}
	if got := st.Statuses[0].RunState; got != "running" {
		t.Fatalf("stored status says %s; the host last reported running", got)
	}
}

func hostRecordOf(name string, dead *time.Time) hostRecord {
	return hostRecord{Name: name, Addr: "127.0.0.1:1", FenceAfterMS: 5000, DeadAt: dead}
}

func (m *Manager) hostSeenRev(name string) int64 {
	m.hosts.mu.Lock()
	defer m.hosts.mu.Unlock()
	if e, ok := m.hosts.hosts[name]; ok {
		return e.seenRev
	}
	return 0
}

// TestHeartbeatSameReport: a manager takes a numbered report, then
// heartbeats that say Same for it stand for its statuses; Same for a report
// it does not hold is a 409 (the host then sends it in full), and its
// answers say that it takes Same.
func TestHeartbeatSameReport(t *testing.T) {
	m, _ := newTestManager(t)
	ctx := context.Background()
	addLiveHost(t, m)
	beat := func(hb hostproto.Heartbeat) int {
		t.Helper()
		body, _ := json.Marshal(hb)
		r := httptest.NewRequest(http.MethodPost, "/v1/hosts/h0/heartbeat", bytes.NewReader(body))
		r = r.WithContext(context.WithValue(ctx, callerKey{}, caller{Kind: "host", Name: "h0", Role: "host"}))
		w := httptest.NewRecorder()
		m.handleHeartbeat(w, r)
		if w.Code == http.StatusNoContent && w.Header().Get(hostproto.ReportsHeader) != hostproto.ReportsSame {
			t.Fatalf("a heartbeat's answer does not say the manager takes Same: %v", w.Header())
		}
		return w.Code
	}
	same := func(n uint64) hostproto.Heartbeat { return hostproto.Heartbeat{Info: reportOf(nil).Info, Same: n} }
	if code := beat(same(5)); code != http.StatusConflict {
		t.Fatalf("Same for a report never sent: %d, want 409", code)
	}
	full := reportOf(nil)
	full.Report = 5
	if code := beat(full); code != http.StatusNoContent {
		t.Fatalf("full report: %d", code)
	}
	ticked := same(5)
	ticked.Guests = []hostproto.GuestTick{{Name: "a", Seq: 8, UptimeSeconds: 4, LastHeartbeat: time.Unix(100, 0)}}
	if code := beat(ticked); code != http.StatusNoContent {
		t.Fatalf("Same for the report taken: %d", code)
	}
	st, ok := m.remote("h0").Status("a")
	if !ok || !st.Running || st.Usage == nil || st.Usage.CPUSeconds != 1.5 || st.Guest == nil || st.Guest.Seq != 8 || st.Guest.BootID != "b1" {
		t.Fatalf("after Same, vm a is %+v (%v); want the statuses of report 5 with the guest's new counters", st, ok)
	}
	if held, ok := m.heldReport("h0", 5); !ok || len(held) != 1 || held[0].Guest.Seq != 7 {
		t.Fatalf("report 5 held: %+v (%v); want it as the host sent it, not changed by the counters laid over it", held, ok)
	}
	ticked.Guests[0].Name = "nope"
	if code := beat(ticked); code != http.StatusConflict {
		t.Fatalf("Same with counters for a vm not in the report: %d, want 409", code)
	}
	if code := beat(same(4)); code != http.StatusConflict {
		t.Fatalf("Same for an older report: %d, want 409", code)
	}
	stopped := reportOf(func(hb *hostproto.Heartbeat) { hb.Statuses[0].Running, hb.Statuses[0].RunState = false, "shutdown" })
	stopped.Report = 6
	if code := beat(stopped); code != http.StatusNoContent {
		t.Fatalf("report 6: %d", code)
	}
	if code := beat(same(5)); code != http.StatusConflict {
		t.Fatalf("Same for report 5 after report 6: %d, want 409", code)
	}
	if code := beat(same(6)); code != http.StatusNoContent {
		t.Fatalf("Same for report 6: %d", code)
	}
	if st, _ := m.remote("h0").Status("a"); st.Running {
		t.Fatal("vm a runs after Same for the report that stopped it")
	}
}
