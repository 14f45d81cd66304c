package manager

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/hostproto"
	"github.com/vigil-project/vigil/internal/remotehost"
)

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

func TestSameReport(t *testing.T) {
	vm := func(f func(*hostproto.VMStatus)) func(*hostproto.Heartbeat) {
		return func(hb *hostproto.Heartbeat) { f(&hb.Statuses[0]) }
	}
	tests := []struct {
		name string
		mut  func(*hostproto.Heartbeat)
		same bool
	}{
		{"identical", nil, true},
		{"usage counters moved", vm(func(s *hostproto.VMStatus) { s.Usage = &hostproto.VMUsage{CPUSeconds: 9} }), true},
		{"guest heartbeat, sequence, uptime, load", vm(func(s *hostproto.VMStatus) {
			s.Guest = &api.GuestInfo{BootID: "b1", Seq: 8, UptimeSeconds: 4, Load1: 0.5, MemUsedBytes: 1, LastHeartbeat: time.Unix(101, 0), Agent: "vigil", Addresses: []string{"10.0.0.2"}}
		}), true},
		{"checkpoint figures", vm(func(s *hostproto.VMStatus) {
			s.Protection = &hostproto.ProtectionStatus{Secondary: "h1", Generation: 2, State: "protected", Seq: 5, CommittedAt: time.Unix(99, 0), Bytes: 4096, SecondaryHeardAt: time.Unix(99, 0)}
		}), true},
		{"host's heartbeat time and state", func(hb *hostproto.Heartbeat) { hb.Info.LastHeartbeat, hb.Info.State = time.Unix(200, 0), "" }, true},
		{"started time in another zone", vm(func(s *hostproto.VMStatus) { s.StartedAt = time.Unix(50, 0).In(time.FixedZone("x", 3600)) }), true},
		{"vm stopped", vm(func(s *hostproto.VMStatus) { s.Running = false }), false},
		{"new qemu", vm(func(s *hostproto.VMStatus) { s.PID = 11 }), false},
		{"paused", vm(func(s *hostproto.VMStatus) { s.RunState = "paused" }), false},
		{"restarted", vm(func(s *hostproto.VMStatus) { s.StartedAt = time.Unix(60, 0) }), false},
		{"state file waiting", vm(func(s *hostproto.VMStatus) { s.SavedState = true }), false},
		{"busy", vm(func(s *hostproto.VMStatus) { s.Busy = "migrate" }), false},
		{"guest agent gone", vm(func(s *hostproto.VMStatus) { s.Guest = nil }), false},
		{"guest rebooted", vm(func(s *hostproto.VMStatus) { g := *s.Guest; g.BootID = "b2"; s.Guest = &g }), false},
		{"guest address changed", vm(func(s *hostproto.VMStatus) { g := *s.Guest; g.Addresses = []string{"10.0.0.3"}; s.Guest = &g }), false},
		{"protection degraded", vm(func(s *hostproto.VMStatus) { p := *s.Protection; p.State = "degraded"; s.Protection = &p }), false},
		{"new secondary", vm(func(s *hostproto.VMStatus) {
			p := *s.Protection
			p.Secondary, p.Generation = "h2", 3
			s.Protection = &p
		}), false},
		{"protection ended", vm(func(s *hostproto.VMStatus) { s.Protection = nil }), false},
		{"same vms, another order", func(hb *hostproto.Heartbeat) {
			hb.Statuses = append([]hostproto.VMStatus{{Name: "b"}}, hb.Statuses...)
		}, false},
		{"a vm more", func(hb *hostproto.Heartbeat) { hb.Statuses = append(hb.Statuses, hostproto.VMStatus{Name: "b"}) }, false},
		{"no vm", func(hb *hostproto.Heartbeat) { hb.Statuses = nil }, false},
		{"host memory changed", func(hb *hostproto.Heartbeat) { hb.Info.MemoryBytes = 16 << 30 }, false},
		{"host pool changed", func(hb *hostproto.Heartbeat) { hb.Info.StoragePool = "p2" }, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := sameReport(reportOf(nil), reportOf(tt.mut)); got != tt.same {
				t.Fatalf("sameReport = %v, want %v", got, tt.same)
			}
		})
	}
	// A host may list its VMs in any order (a map): the order is no change.
	two := func(first, second string) hostproto.Heartbeat {
		return reportOf(func(hb *hostproto.Heartbeat) {
			hb.Statuses = []hostproto.VMStatus{{Name: first, Running: true}, {Name: second}}
		})
	}
	if !sameReport(two("a", "b"), reportOf(func(hb *hostproto.Heartbeat) {
		hb.Statuses = []hostproto.VMStatus{{Name: "b"}, {Name: "a", Running: true}}
	})) {
		t.Fatal("the same vms in another order count as a change")
	}
	if sameReport(two("a", "b"), two("b", "a")) {
		t.Fatal("a vm that stopped and another that started count as no change")
	}
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

// TestHeartbeatAfterUnseenDeath: a death another manager stored, which this
// one has not seen yet, still refuses the heartbeat (the write is
// conditioned on the host's record) and stores nothing.
func TestHeartbeatAfterUnseenDeath(t *testing.T) {
	m, _ := newTestManager(t)
	ctx := context.Background()
	m.AddHost(remotehost.New("h0", "127.0.0.1:1", m.identity.HostClientTLS("h0")))
	rev, err := m.store.PutIf(ctx, "hosts/h0", hostRecord{Name: "h0", Addr: "127.0.0.1:1"}, "hosts/h0", 0)
	if err != nil {
		t.Fatal(err)
	}
	m.setLiveRecordRev("h0", rev)
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
