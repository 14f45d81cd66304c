package manager

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/hostproto"
	"github.com/vigil-project/vigil/internal/remotehost"
)

// deadHost registers a remote host h0 of pool p1 that reports once now and
// never again (nothing listens at its address).
func deadHost(t *testing.T, m *Manager) *remotehost.Host {
	t.Helper()
	h := remotehost.New("h0", "127.0.0.1:1", m.identity.HostClientTLS("h0"))
	h.Heartbeat(hostproto.Heartbeat{Info: api.Host{Name: "h0", MemoryBytes: 64 << 30, CPUs: 16, StoragePool: "p1"}}, 0, time.Now())
	m.AddHost(h)
	if err := m.store.Put(context.Background(), "hosts/h0", hostRecord{Name: "h0", Addr: "127.0.0.1:1", FenceAfterMS: 5000}); err != nil {
		t.Fatal(err)
	}
	return h
}

// setLeadingFor makes the manager look as if it had led for d.
func setLeadingFor(m *Manager, d time.Duration) {
	m.leaderSince.Store(int64(time.Since(m.started) - d))
}

func TestDetectDeaths(t *testing.T) {
	const deadAfter = 300 * time.Millisecond
	tests := []struct {
		name        string
		silence     time.Duration
		leadingFor  time.Duration
		wantDead    bool
		heartbeatAt bool // another manager stores a heartbeat this one has not seen
	}{
		{"silent past the limit", 2 * deadAfter, time.Minute, true, false},
		{"heartbeating", 0, time.Minute, false, false},
		{"a new leader gives hosts time to report first", 2 * deadAfter, 0, false, false},
		{"a heartbeat stored by another manager counts", 2 * deadAfter, time.Minute, false, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, _ := newTestManager(t)
			m.deadAfter = deadAfter
			deadHost(t, m)
			time.Sleep(tt.silence)
			if tt.heartbeatAt {
				if err := m.store.Put(context.Background(), "hostseen/h0", hostSeenRecord{Seen: time.Now()}); err != nil {
					t.Fatal(err)
				}
			}
			setLeadingFor(m, tt.leadingFor)
			m.detectDeaths(context.Background())
			if got := m.hostState("h0") == "dead"; got != tt.wantDead {
				t.Fatalf("declared dead = %v, want %v", got, tt.wantDead)
			}
			death, dead := m.hostDeath(context.Background(), "h0")
			if dead != tt.wantDead {
				t.Fatalf("store says dead = %v, want %v", dead, tt.wantDead)
			}
			if !dead {
				return
			}
			if death.DeadAt == nil {
				t.Fatalf("death record %+v", death)
			}
			err := m.Heartbeat(context.Background(), "h0", hostproto.Heartbeat{})
			if !errors.Is(err, ErrGone) {
				t.Fatalf("heartbeat of a dead host: %v, want ErrGone", err)
			}
		})
	}
}

// TestDeathDeclaredPromptly: the leader's watch declares a silent host
// dead within deathCheck (and etcd's time) of deadAfter, not at its next
// pass over the records. With deadAfter just over one pass, a watch that
// looked only at its passes would declare it almost a pass late.
func TestDeathDeclaredPromptly(t *testing.T) {
	m, _ := newTestManager(t)
	m.deadAfter = failoverPass + 50*time.Millisecond
	setLeadingFor(m, time.Minute)
	h := deadHost(t, m)
	heard := h.HeardAt()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); m.WatchHostFailures(ctx) }()
	defer func() { cancel(); <-done }()
	for m.hostState("h0") != "dead" {
		if time.Since(heard) > 5*m.deadAfter {
			t.Fatal("h0 was never declared dead")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if late := time.Since(heard) - m.deadAfter; late > deathCheck+250*time.Millisecond {
		t.Fatalf("declared dead %s after deadAfter, want within %s", late.Round(time.Millisecond), deathCheck+250*time.Millisecond)
	}
}

// TestDeathIgnoresClockSteps: host death is judged on the monotonic clock,
// so the wall clock jumping an hour (either way) declares nobody dead.
// Heartbeats recorded with wall times an hour off change nothing either.
func TestDeathIgnoresClockSteps(t *testing.T) {
	for _, step := range []time.Duration{time.Hour, -time.Hour} {
		m, _ := newTestManager(t)
		m.deadAfter = 300 * time.Millisecond
		h := deadHost(t, m)
		setLeadingFor(m, time.Minute)
		h.Heartbeat(hostproto.Heartbeat{Info: api.Host{Name: "h0"}}, 0, time.Now().Add(step))
		m.detectDeaths(context.Background())
		if m.hostState("h0") == "dead" {
			t.Fatalf("a heartbeat stamped %s away made the host dead", step)
		}
		// And it delays no failover: silent for deadAfter on the
		// monotonic clock, it is dead, whatever its stamp said.
		time.Sleep(400 * time.Millisecond)
		m.detectDeaths(context.Background())
		if m.hostState("h0") != "dead" {
			t.Fatalf("a host silent past the limit, its last heartbeat stamped %s away, is not dead", step)
		}
	}
}

// TestEvacuate moves the VMs of a dead host: pooled ones to a host of the
// pool under a new epoch (started only if they should run and may be
// restarted), a local one stays stranded.
func TestEvacuate(t *testing.T) {
	m, target := newTestManager(t)
	target.mu.Lock()
	target.pool = "p1"
	target.mu.Unlock()
	target.notify()
	m.deadAfter = 100 * time.Millisecond
	deadHost(t, m)
	setLeadingFor(m, time.Minute)
	ctx := context.Background()
	vm := func(name, pool, desired string, state api.VMState, recovery string) {
		r := record{Spec: hostproto.VMSpec{Name: name, Pool: pool, Epoch: 1, MemoryBytes: 128 << 20, CPUs: 1, HostPort: 30000 + len(name)},
			Host: "h0", Desired: desired, State: state, Policy: api.RecoveryPolicy{Recovery: recovery}}
		if _, err := m.store.Create(ctx, vmKey(name), r); err != nil {
			t.Fatal(err)
		}
	}
	vm("web", "p1", desiredRunning, api.StateRunning, "")
	vm("local", "", desiredRunning, api.StateRunning, "")
	vm("cold", "p1", desiredStopped, api.StateStopped, "")
	vm("manual", "p1", desiredRunning, api.StateRunning, "none")

	// settle waits for the work queue to finish with a VM.
	settle := func(name string, done func(record) bool) {
		t.Helper()
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
			r, _, err := m.load(ctx, name)
			if err == nil && done(r) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s did not settle: %+v", name, r)
			}
		}
	}
	time.Sleep(200 * time.Millisecond)
	m.detectDeaths(ctx)
	if m.hostState("h0") != "dead" {
		t.Fatal("h0 was not declared dead")
	}
	waitMirror(t, m)
	m.enqueueAll(ctx)
	settle("web", func(r record) bool { return r.Failover == nil && r.Host == "h1" && r.Op == nil })
	settle("local", func(r record) bool { return r.Stranded && r.Op == nil })
	settle("cold", func(r record) bool { return r.Host == "h1" && r.Op == nil })
	settle("manual", func(r record) bool { return r.Host == "h1" && r.Op == nil })

	tests := []struct {
		vm        string
		host      string
		epoch     int64
		state     api.VMState
		msg       string
		started   bool
		incidents int
	}{
		{"web", "h1", 2, api.StateRunning, "restarted on h1 after host h0 died", true, 1},
		{"local", "h0", 1, api.StateCrashed, "local storage", false, 0},
		{"cold", "h1", 2, api.StateStopped, "moved from dead host h0", false, 0},
		{"manual", "h1", 2, api.StateCrashed, "recovery is off", false, 0},
	}
	for _, tt := range tests {
		t.Run(tt.vm, func(t *testing.T) {
			r, _, err := m.load(ctx, tt.vm)
			if err != nil {
				t.Fatal(err)
			}
			if r.Host != tt.host || r.Spec.Epoch != tt.epoch || r.State != tt.state || !strings.Contains(r.Message, tt.msg) || r.Failover != nil {
				t.Fatalf("record: host %s epoch %d state %s message %q failover %+v; want %s %d %s %q",
					r.Host, r.Spec.Epoch, r.State, r.Message, r.Failover, tt.host, tt.epoch, tt.state, tt.msg)
			}
			if got := target.called("start " + tt.vm); got != tt.started {
				t.Fatalf("started on the new host = %v, want %v (calls %v)", got, tt.started, target.callsString())
			}
			incs, err := m.Incidents(ctx, tt.vm)
			if err != nil || len(incs) != tt.incidents {
				t.Fatalf("incidents %+v, %v; want %d", incs, err, tt.incidents)
			}
			if tt.incidents == 0 {
				return
			}
			var steps []string
			for _, e := range incs[0].Timeline {
				steps = append(steps, e.Event)
			}
			want := []string{"last heartbeat", "fenced", "declared dead", "moved", "restarted"}
			if incs[0].Kind != hostproto.IncidentHostFailure || !slices.Equal(steps, want) {
				t.Fatalf("incident %s with timeline %v; want host-failure with %v", incs[0].Kind, steps, want)
			}
		})
	}

	// A refused start is kept on the timeline and retried on the next pass.
	vm("retry", "p1", desiredRunning, api.StateRunning, "")
	target.fail("start", errors.New("disk in use"))
	m.queue.Add("retry")
	settle("retry", func(r record) bool { return strings.Contains(r.Message, "disk in use") && r.Op == nil })
	if r, _, _ := m.load(ctx, "retry"); r.State != api.StateRecovering || r.Failover == nil {
		t.Fatalf("after a refused start: %s %q %+v", r.State, r.Message, r.Failover)
	}
	m.queue.Add("retry")
	settle("retry", func(r record) bool { return r.State == api.StateRunning && r.Host == "h1" })
	incs, _ := m.Incidents(ctx, "retry")
	if len(incs) != 1 || !slices.ContainsFunc(incs[0].Timeline, func(e api.TimelineEntry) bool { return e.Event == "start refused" }) {
		t.Fatalf("refusal not on the timeline: %+v", incs)
	}
}

// TestDrainKeepsWhatCannotMove drains a host whose VM has a local disk: the
// host takes no new VMs, the VM stays with the reason, enable undoes it.
func TestDrainKeepsWhatCannotMove(t *testing.T) {
	m, _ := newTestManager(t)
	ctx := context.Background()
	mustCreate(t, m, "local", true)
	res, err := m.Drain(ctx, "h1")
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Moved) != 0 || len(res.Stayed) != 1 || !strings.Contains(res.Stayed[0].Reason, "local storage") {
		t.Fatalf("drain result %+v; want local to stay because of its local disk", res)
	}
	if _, err := m.Create(ctx, api.VMCreateRequest{Name: "new", MemoryBytes: 128 << 20, CPUs: 1, DiskBytes: 256 << 20}); !errors.Is(err, ErrConflict) || !strings.Contains(err.Error(), "h1 is drained") {
		t.Fatalf("create on a drained host: %v", err)
	}
	if hs := m.Hosts(); len(hs) != 1 || !hs[0].Drained {
		t.Fatalf("hosts %+v; want h1 drained", hs)
	}
	if err := m.Enable(ctx, "h1"); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Create(ctx, api.VMCreateRequest{Name: "new", MemoryBytes: 128 << 20, CPUs: 1, DiskBytes: 256 << 20}); err != nil {
		t.Fatalf("create after enable: %v", err)
	}
	if _, err := m.Drain(ctx, "nohost"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("drain of an unknown host: %v", err)
	}
}

// TestEvacuateProtected: a protected VM whose host dies continues on its
// secondary from the standby (activate, not start), and is then without a
// secondary (re-protecting); a standby that cannot be used makes it
// restart instead, and says why on the incident.
func TestEvacuateProtected(t *testing.T) {
	tests := []struct {
		name        string
		activateErr error
		wantCalls   []string
		wantState   string
		wantStep    string
	}{
		{"continues from the checkpoint", nil, []string{"activate prot"}, protReprotecting, "continued from checkpoint"},
		{"restarts when the standby is unusable", fmt.Errorf("%w: no committed checkpoint here", hostproto.ErrBadState), []string{"activate prot", "start prot"}, "", "standby not usable"},
		{"retries a refused activation", fmt.Errorf("%w: the old copy holds it", hostproto.ErrDiskInUse), []string{"activate prot"}, protReprotecting, "activation refused"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, target := newTestManager(t)
			target.mu.Lock()
			target.pool = "p1"
			target.mu.Unlock()
			target.notify()
			m.deadAfter = 100 * time.Millisecond
			deadHost(t, m)
			setLeadingFor(m, time.Minute)
			ctx := context.Background()
			r := record{Spec: hostproto.VMSpec{Name: "prot", Pool: "p1", Epoch: 1, MemoryBytes: 128 << 20, CPUs: 1, HostPort: 30100},
				Host: "h0", Desired: desiredRunning, State: api.StateRunning,
				Protection: &protection{IntervalMS: 300, Secondary: "h1", Generation: 4, State: protProtected, Run: "run-1"}}
			if _, err := m.store.Create(ctx, vmKey("prot"), r); err != nil {
				t.Fatal(err)
			}
			if tt.activateErr != nil {
				target.fail("activate", tt.activateErr)
			}
			time.Sleep(200 * time.Millisecond)
			m.detectDeaths(ctx)
			waitMirror(t, m)
			m.enqueueAll(ctx)
			var got record
			for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
				m.queue.Add("prot") // the next pass (a refusal is retried)
				got, _, _ = m.load(ctx, "prot")
				if got.Failover == nil && got.Host == "h1" && got.Op == nil && got.State == api.StateRunning {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("did not settle: %+v", got)
				}
			}
			for _, c := range tt.wantCalls {
				if !target.called(c) {
					t.Fatalf("no %q call; calls %v", c, target.callsString())
				}
			}
			if tt.wantState != "" && target.called("start prot") {
				t.Fatalf("restarted although the standby was activated: %v", target.callsString())
			}
			if got.Spec.Epoch != 2 || got.Protection == nil || got.Protection.Secondary != "" || got.Protection.Run != "" {
				t.Fatalf("after the failover: epoch %d, protection %+v; want epoch 2 and no secondary", got.Spec.Epoch, got.Protection)
			}
			if tt.wantState != "" && got.Protection.State != tt.wantState {
				t.Fatalf("protection state %q, want %q", got.Protection.State, tt.wantState)
			}
			incs, err := m.Incidents(ctx, "prot")
			if err != nil || len(incs) != 1 {
				t.Fatalf("incidents %+v, %v", incs, err)
			}
			if !slices.ContainsFunc(incs[0].Timeline, func(e api.TimelineEntry) bool { return e.Event == tt.wantStep }) {
				t.Fatalf("timeline %+v lacks %q", incs[0].Timeline, tt.wantStep)
			}
			if want := "continue on h1 from its last checkpoint"; incs[0].Action != want {
				t.Fatalf("incident action %q, want %q", incs[0].Action, want)
			}
		})
	}
}

// TestStrayProtectionIsStopped: a host that checkpoints a VM whose record
// has no protection (an unprotect it missed) is told to stop.
func TestStrayProtectionIsStopped(t *testing.T) {
	m, h := newTestManager(t)
	ctx := context.Background()
	if _, err := m.Create(ctx, api.VMCreateRequest{Name: "web", MemoryBytes: 128 << 20, CPUs: 1, DiskBytes: 256 << 20, Start: true}); err != nil {
		t.Fatal(err)
	}
	h.Protect(ctx, hostproto.ProtectRequest{VM: "web", Secondary: "h9", Generation: 3})
	for deadline := time.Now().Add(5 * time.Second); !h.called("unprotect web"); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the stray protection was not stopped: %v", h.callsString())
		}
		rs, err := m.records(ctx)
		if err != nil {
			t.Fatal(err)
		}
		m.protectionPass(ctx, rs)
	}
	if st, _ := m.hostNamed("h1").Status("web"); st.Protection != nil {
		t.Fatalf("host still reports %+v", st.Protection)
	}
}
