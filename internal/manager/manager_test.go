package manager

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/hostproto"
)

func call(t *testing.T, srv http.Handler, method, path, body string) (int, []byte) {
	t.Helper()
	req := httptest.NewRequest(method, path, strings.NewReader(body))
	rec := httptest.NewRecorder()
	srv.ServeHTTP(rec, req)
	return rec.Code, rec.Body.Bytes()
}

func TestAPIValidationAndErrorMapping(t *testing.T) {
	m, h := newTestManager(t)
	srv := authed(t, m, RoleAdmin)
	if code, b := call(t, srv, "POST", "/v1/vms", `{"name":"web1","memory_bytes":134217728,"cpus":1,"disk_bytes":268435456}`); code != 201 {
		t.Fatalf("create web1: %d %s", code, b)
	}
	tests := []struct {
		name, method, path, body string
		wantStatus               int
		wantCode, wantMsg        string
	}{
		{"malformed json", "POST", "/v1/vms", `{"name":`, 400, "invalid", "malformed JSON"},
		{"unknown field", "POST", "/v1/vms", `{"name":"a","memroy":1}`, 400, "invalid", "unknown field"},
		{"two values", "POST", "/v1/vms", `{"name":"a"} {}`, 400, "invalid", "more than one"},
		{"bad name", "POST", "/v1/vms", `{"name":"Web_1","memory_bytes":134217728,"cpus":1,"disk_bytes":268435456}`, 400, "invalid", "DNS"},
		{"name too long", "POST", "/v1/vms", `{"name":"` + strings.Repeat("a", 64) + `","memory_bytes":134217728,"cpus":1,"disk_bytes":268435456}`, 400, "invalid", "1-63"},
		{"zero memory", "POST", "/v1/vms", `{"name":"a","memory_bytes":0,"cpus":1,"disk_bytes":268435456}`, 400, "invalid", "too small"},
		{"absurd memory", "POST", "/v1/vms", `{"name":"a","memory_bytes":1099511627776,"cpus":1,"disk_bytes":268435456}`, 400, "invalid", "more than the host has"},
		{"zero cpus", "POST", "/v1/vms", `{"name":"a","memory_bytes":134217728,"cpus":0,"disk_bytes":268435456}`, 400, "invalid", "at least 1"},
		{"absurd cpus", "POST", "/v1/vms", `{"name":"a","memory_bytes":134217728,"cpus":1000,"disk_bytes":268435456}`, 400, "invalid", "more than allowed"},
		{"zero disk", "POST", "/v1/vms", `{"name":"a","memory_bytes":134217728,"cpus":1,"disk_bytes":0}`, 400, "invalid", "too small"},
		{"absurd disk", "POST", "/v1/vms", `{"name":"a","memory_bytes":134217728,"cpus":1,"disk_bytes":9223372036854775807}`, 400, "invalid", "limit"},
		{"duplicate", "POST", "/v1/vms", `{"name":"web1","memory_bytes":134217728,"cpus":1,"disk_bytes":268435456}`, 409, "conflict", "already exists"},
		{"unknown vm", "GET", "/v1/vms/nope", "", 404, "not_found", "does not exist"},
		{"unknown vm state", "PUT", "/v1/vms/nope/state", `{"action":"start"}`, 404, "not_found", "does not exist"},
		{"unknown vm delete", "DELETE", "/v1/vms/nope", "", 404, "not_found", "does not exist"},
		{"stop a stopped vm", "PUT", "/v1/vms/web1/state", `{"action":"stop"}`, 409, "conflict", "already stopped"},
		{"unknown action", "PUT", "/v1/vms/web1/state", `{"action":"dance"}`, 400, "invalid", "unknown action"},
		{"negative timeout", "PUT", "/v1/vms/web1/state", `{"action":"stop","timeout_seconds":-1}`, 400, "invalid", "negative"},
		{"unknown endpoint", "GET", "/v1/nothing", "", 404, "not_found", "no such endpoint"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, b := call(t, srv, tt.method, tt.path, tt.body)
			var e api.Error
			if err := json.Unmarshal(b, &e); err != nil {
				t.Fatalf("answer is not an api.Error: %s", b)
			}
			if code != tt.wantStatus || e.Code != tt.wantCode || !strings.Contains(e.Error, tt.wantMsg) {
				t.Fatalf("got %d %q %q, want %d %q containing %q", code, e.Code, e.Error, tt.wantStatus, tt.wantCode, tt.wantMsg)
			}
			if strings.Contains(e.Error, "\n") {
				t.Fatalf("error is not one line: %q", e.Error)
			}
		})
	}
	if !h.exists("web1") || h.exists("a") {
		t.Fatalf("rejected requests changed the host: %v", h.callsString())
	}
}

func TestStatusOf(t *testing.T) {
	tests := []struct {
		err    error
		status int
	}{
		{errorf(ErrInvalid, "x"), 400},
		{fmt.Errorf("wrapped: %w", errorf(ErrNotFound, "x")), 404},
		{errorf(ErrConflict, "x"), 409},
		{errorf(ErrBusy, "x"), 409},
		{wrapf(ErrUnavailable, errors.New("etcd down"), "x"), 503},
		{errors.New("boom"), 500},
	}
	for _, tt := range tests {
		if got, _ := statusOf(tt.err); got != tt.status {
			t.Fatalf("statusOf(%v) = %d, want %d", tt.err, got, tt.status)
		}
	}
}

func TestFailedCreateLeavesNothing(t *testing.T) {
	m, h := newTestManager(t)
	h.fail("create", errors.New("disk full"))
	_, err := m.Create(context.Background(), api.VMCreateRequest{Name: "web1", MemoryBytes: 128 << 20, CPUs: 1, DiskBytes: 256 << 20})
	if err == nil || !strings.Contains(err.Error(), "disk full") {
		t.Fatalf("create error = %v, want the host's failure", err)
	}
	if _, err := m.Get(context.Background(), "web1"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("after a failed create, get = %v, want not found", err)
	}
	// The name is free again.
	if _, err := m.Create(context.Background(), api.VMCreateRequest{Name: "web1", MemoryBytes: 128 << 20, CPUs: 1, DiskBytes: 256 << 20}); err != nil {
		t.Fatalf("create after failure: %v", err)
	}
}

func TestLifecycleStatesAndEvents(t *testing.T) {
	m, h := newTestManager(t)
	ctx := context.Background()
	_, ch, cancel := m.Events().Subscribe(0)
	defer cancel()

	vm, err := m.Create(ctx, api.VMCreateRequest{Name: "web1", MemoryBytes: 128 << 20, CPUs: 1, DiskBytes: 256 << 20, Start: true})
	if err != nil || vm.State != api.StateRunning || vm.PID != 42 {
		t.Fatalf("create --start = %+v, %v; want running with a pid", vm, err)
	}
	steps := []struct {
		action api.Action
		want   api.VMState
	}{
		{api.ActionStop, api.StateStopped},
		{api.ActionStart, api.StateRunning},
		{api.ActionRestart, api.StateRunning},
	}
	for _, s := range steps {
		vm, err := m.ChangeState(ctx, "web1", api.VMStateRequest{Action: s.action})
		if err != nil || vm.State != s.want {
			t.Fatalf("%s: %+v, %v; want %s", s.action, vm, err, s.want)
		}
	}
	if _, err := m.ChangeState(ctx, "web1", api.VMStateRequest{Action: api.ActionStart}); !errors.Is(err, ErrConflict) {
		t.Fatalf("start a running vm: %v, want conflict", err)
	}
	if err := m.Delete(ctx, "web1", false); err != nil {
		t.Fatalf("delete: %v", err)
	}
	if h.exists("web1") {
		t.Fatal("delete left the vm on the host")
	}
	var states []string
	timeout := time.After(2 * time.Second)
	for done := false; !done; {
		select {
		case e := <-ch:
			if e.Type == "vm.state" {
				states = append(states, string(e.State))
			}
			if e.Type == "vm.deleted" {
				done = true
			}
		case <-timeout:
			t.Fatalf("no vm.deleted event; saw states %v", states)
		}
	}
	want := "stopped starting running stopping stopped starting running stopping stopped starting running deleting"
	if got := strings.Join(states, " "); got != want {
		t.Fatalf("state events:\n got %s\nwant %s", got, want)
	}
}

func TestBusyVMRefusesSecondOperation(t *testing.T) {
	m, h := newTestManager(t)
	ctx := context.Background()
	if _, err := m.Create(ctx, api.VMCreateRequest{Name: "web1", MemoryBytes: 128 << 20, CPUs: 1, DiskBytes: 256 << 20, Start: true}); err != nil {
		t.Fatal(err)
	}
	h.mu.Lock()
	h.stopDelay = 300 * time.Millisecond
	h.mu.Unlock()
	done := make(chan error)
	go func() {
		_, err := m.ChangeState(ctx, "web1", api.VMStateRequest{Action: api.ActionStop})
		done <- err
	}()
	time.Sleep(100 * time.Millisecond)
	if err := m.Delete(ctx, "web1", false); !errors.Is(err, ErrBusy) {
		t.Fatalf("delete during stop: %v, want busy", err)
	}
	if err := <-done; err != nil {
		t.Fatalf("stop: %v", err)
	}
}

func TestReconcileConverges(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		name      string
		desired   string
		state     api.VMState
		running   bool
		wantState api.VMState
		wantGone  bool
	}{
		{"running vm found dead is restarted (default policy)", desiredRunning, api.StateRunning, false, api.StateRunning, false},
		{"interrupted start that did start", desiredRunning, api.StateStarting, true, api.StateRunning, false},
		{"interrupted stop is finished", desiredStopped, api.StateStopping, true, api.StateStopped, false},
		{"stopped stays stopped", desiredStopped, api.StateStopped, false, api.StateStopped, false},
		{"interrupted delete is finished", desiredStopped, api.StateDeleting, false, "", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, h := newTestManager(t)
			if _, err := m.Create(ctx, api.VMCreateRequest{Name: "v", MemoryBytes: 128 << 20, CPUs: 1, DiskBytes: 256 << 20}); err != nil {
				t.Fatal(err)
			}
			r, _, _ := m.load(ctx, "v")
			r.Desired, r.State = tt.desired, tt.state
			putRecord(t, m, r)
			h.set("v", tt.running)
			if err := m.Reconcile(ctx, "v"); err != nil {
				t.Fatalf("reconcile: %v", err)
			}
			got, err := m.Get(ctx, "v")
			if tt.wantGone {
				if !errors.Is(err, ErrNotFound) || h.exists("v") {
					t.Fatalf("want the vm gone, got %+v %v", got, err)
				}
				return
			}
			if err != nil || got.State != tt.wantState {
				t.Fatalf("state = %q (%v), want %q", got.State, err, tt.wantState)
			}
		})
	}
}

func waitState(t *testing.T, m *Manager, name string, want api.VMState) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for {
		vm, _ := m.Get(context.Background(), name)
		if vm.State == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("state %q, want %q", vm.State, want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func crash(h *fakeHost, m *Manager, name, kind string) {
	h.set(name, kind != hostproto.IncidentExit)
	e := hostproto.Event{Host: "h1", VM: name, Kind: hostproto.EventIncident, Incident: &hostproto.Incident{Kind: kind, DetectedAt: time.Now().UTC()}}
	if kind == hostproto.IncidentExit {
		e.Kind = hostproto.EventExited
	}
	m.HandleHostEvent(e)
}

func TestHostExitEvents(t *testing.T) {
	ctx := context.Background()
	for _, tt := range []struct {
		name     string
		policy   *api.RecoveryPolicy
		kind     string
		want     api.VMState
		wantCall string
	}{
		{"unexpected exit is restarted", nil, hostproto.IncidentExit, api.StateRunning, "restart v"},
		{"panic is restarted", nil, hostproto.IncidentPanic, api.StateRunning, "restart v"},
		{"hang is restarted", nil, hostproto.IncidentHang, api.StateRunning, "restart v"},
		{"recovery none leaves it crashed", &api.RecoveryPolicy{Recovery: "none"}, hostproto.IncidentPanic, api.StateCrashed, ""},
	} {
		t.Run(tt.name, func(t *testing.T) {
			m, h := newTestManager(t)
			if _, err := m.Create(ctx, api.VMCreateRequest{Name: "v", MemoryBytes: 128 << 20, CPUs: 1, DiskBytes: 256 << 20, Start: true, Policy: tt.policy}); err != nil {
				t.Fatal(err)
			}
			crash(h, m, "v", tt.kind)
			if tt.want == api.StateRunning {
				waitFor(t, func() bool { return strings.Contains(h.callsString(), tt.wantCall) })
			}
			waitState(t, m, "v", tt.want)
			incs, err := m.Incidents(ctx, "v")
			if err != nil || len(incs) != 1 || incs[0].Kind != tt.kind {
				t.Fatalf("incidents = %+v, %v", incs, err)
			}
			// The restarted guest's first heartbeat closes the incident.
			if tt.want == api.StateRunning {
				m.HandleHostEvent(hostproto.Event{Host: "h1", VM: "v", Kind: hostproto.EventGuestReady, Time: time.Now().UTC()})
				waitFor(t, func() bool {
					incs, _ := m.Incidents(ctx, "v")
					return len(incs) == 1 && incs[0].RecoveredAt != nil && incs[0].Action == "restart"
				})
			}
		})
	}
	t.Run("a guest that powers itself off is stopped", func(t *testing.T) {
		m, h := newTestManager(t)
		mustCreate(t, m, "v", true)
		h.set("v", false)
		m.HandleHostEvent(hostproto.Event{Host: "h1", VM: "v", Kind: hostproto.EventExited, Expected: true, Message: hostproto.MsgGuestPoweredOff})
		waitState(t, m, "v", api.StateStopped)
	})
	t.Run("an exit Vigil caused does not stop the vm", func(t *testing.T) {
		m, h := newTestManager(t)
		mustCreate(t, m, "v", true)
		h.set("v", false) // killed by a restart that then failed, say
		m.HandleHostEvent(hostproto.Event{Host: "h1", VM: "v", Kind: hostproto.EventExited, Expected: true, Message: "qemu exited"})
		time.Sleep(300 * time.Millisecond)
		if r, _, _ := m.load(context.Background(), "v"); r.Desired != desiredRunning {
			t.Fatalf("desired %s after an exit Vigil caused, want running", r.Desired)
		}
	})
}

func TestRestartBudgetEndsInFailed(t *testing.T) {
	ctx := context.Background()
	m, h := newTestManager(t)
	if _, err := m.Create(ctx, api.VMCreateRequest{Name: "v", MemoryBytes: 128 << 20, CPUs: 1, DiskBytes: 256 << 20, Start: true,
		Policy: &api.RecoveryPolicy{MaxRestarts: 2}}); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 2; i++ {
		crash(h, m, "v", hostproto.IncidentPanic)
		n := i + 1
		waitFor(t, func() bool { return strings.Count(h.callsString(), "restart v") == n })
		waitState(t, m, "v", api.StateRunning)
	}
	crash(h, m, "v", hostproto.IncidentPanic)
	waitState(t, m, "v", api.StateFailed)
	// It stays failed: the reconciler does not bring it back.
	if err := m.Reconcile(ctx, "v"); err != nil {
		t.Fatal(err)
	}
	if vm, _ := m.Get(ctx, "v"); vm.State != api.StateFailed || !strings.Contains(vm.Message, "giving up") {
		t.Fatalf("after reconcile: %s %q", vm.State, vm.Message)
	}
	incs, _ := m.Incidents(ctx, "v")
	if len(incs) != 3 || incs[2].Action != "gave-up" {
		t.Fatalf("incidents: %+v", incs)
	}
	// A human starts it again.
	if _, err := m.ChangeState(ctx, "v", api.VMStateRequest{Action: api.ActionStart}); err != nil {
		t.Fatal(err)
	}
	waitState(t, m, "v", api.StateRunning)
}

func TestPolicyValidation(t *testing.T) {
	m, _ := newTestManager(t)
	mustCreate(t, m, "v", false)
	for _, tt := range []struct {
		p    api.RecoveryPolicy
		want string
	}{
		{api.RecoveryPolicy{Recovery: "reboot"}, "unknown recovery"},
		{api.RecoveryPolicy{HangTimeoutSeconds: 1}, "too short"},
		{api.RecoveryPolicy{HangTimeoutSeconds: -1}, "out of range"},
		{api.RecoveryPolicy{MaxRestarts: -2}, "out of range"},
	} {
		if _, err := m.SetPolicy(context.Background(), "v", tt.p); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tt.want) {
			t.Fatalf("SetPolicy(%+v) = %v, want invalid %q", tt.p, err, tt.want)
		}
	}
	vm, err := m.SetPolicy(context.Background(), "v", api.RecoveryPolicy{Recovery: "none", HangTimeoutSeconds: 5})
	if err != nil || vm.Policy.Recovery != "none" || vm.Policy.HangTimeoutSeconds != 5 || vm.Policy.MaxRestarts != 3 {
		t.Fatalf("SetPolicy = %+v, %v", vm.Policy, err)
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 3s")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// waitMirror waits until m's mirror of the VM records holds every change
// the store acknowledged so far (the passes that read it do not wait), and
// returns what it holds. One try waits mirrorWait at most, which a loaded
// machine can exceed; a mirror that never catches up fails the test.
func waitMirror(t *testing.T, m *Manager) []storedRecord {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; {
		if rs, ok := m.consistentRecords(context.Background()); ok {
			return rs
		}
		if time.Now().After(deadline) {
			t.Fatal("the mirror of the vm records did not catch up with the store in 10 s")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestEventsEndpointNDJSON(t *testing.T) {
	m, _ := newTestManager(t)
	m.Events().Publish(api.Event{Type: "vm.created", VM: "a"})
	m.Events().Publish(api.Event{Type: "vm.created", VM: "b"})
	code, b := call(t, authed(t, m, RoleViewer), "GET", "/v1/events?vm=b", "")
	if code != 200 {
		t.Fatalf("status %d", code)
	}
	lines := bytes.Split(bytes.TrimSpace(b), []byte("\n"))
	if len(lines) != 1 {
		t.Fatalf("want one event for vm b, got %q", b)
	}
	var e api.Event
	if err := json.Unmarshal(lines[0], &e); err != nil || e.VM != "b" || e.Seq != 2 {
		t.Fatalf("event = %+v, %v", e, err)
	}
}

// TestEndpointPortIsTheHosts: the endpoint's port is picked by the VM's
// host (on its own loopback), avoiding the ports other VMs hold, not by
// the manager on its own machine.
func TestEndpointPortIsTheHosts(t *testing.T) {
	m, _ := newTestManager(t)
	a, err := m.Create(context.Background(), api.VMCreateRequest{Name: "a", MemoryBytes: 128 << 20, CPUs: 1, DiskBytes: 256 << 20})
	if err != nil {
		t.Fatal(err)
	}
	b, err := m.Create(context.Background(), api.VMCreateRequest{Name: "b", MemoryBytes: 128 << 20, CPUs: 1, DiskBytes: 256 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if a.Endpoint != "127.0.0.1:40001" || b.Endpoint != "127.0.0.1:40002" {
		t.Fatalf("endpoints %s, %s; want the ports the host chose (40001, 40002)", a.Endpoint, b.Endpoint)
	}
}
