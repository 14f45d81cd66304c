package manager

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/hostproto"
)

func mustCreate(t *testing.T, m *Manager, name string, start bool) {
	t.Helper()
	if _, err := m.Create(context.Background(), api.VMCreateRequest{Name: name, MemoryBytes: 128 << 20, CPUs: 1, DiskBytes: 256 << 20, Start: start}); err != nil {
		t.Fatal(err)
	}
}

func TestPauseSuspendResumeTransitions(t *testing.T) {
	m, h := newTestManager(t)
	ctx := context.Background()
	mustCreate(t, m, "v", true)
	steps := []struct {
		req       api.VMStateRequest
		want      api.VMState
		wantErr   error
		errSubstr string
	}{
		{api.VMStateRequest{Action: api.ActionResume}, api.StateRunning, ErrConflict, "already running"},
		{api.VMStateRequest{Action: api.ActionPause}, api.StatePaused, nil, ""},
		{api.VMStateRequest{Action: api.ActionPause}, api.StatePaused, ErrConflict, "already paused"},
		{api.VMStateRequest{Action: api.ActionResume, DiscardState: true}, api.StatePaused, ErrInvalid, "no saved state"},
		{api.VMStateRequest{Action: api.ActionPause, ToDisk: true}, api.StateSuspended, nil, ""}, // paused → suspended
		{api.VMStateRequest{Action: api.ActionStart}, api.StateSuspended, ErrConflict, "vigil vm resume"},
		{api.VMStateRequest{Action: api.ActionStop}, api.StateSuspended, ErrConflict, "--discard-state"},
		{api.VMStateRequest{Action: api.ActionPause, ToDisk: true}, api.StateSuspended, ErrConflict, "already suspended"},
		{api.VMStateRequest{Action: api.ActionResume}, api.StateRunning, nil, ""},
		{api.VMStateRequest{Action: api.ActionPause, ToDisk: true}, api.StateSuspended, nil, ""},
		{api.VMStateRequest{Action: api.ActionResume, DiscardState: true}, api.StateRunning, nil, ""},
		{api.VMStateRequest{Action: api.ActionStart, ToDisk: true}, api.StateRunning, ErrInvalid, "to_disk goes with"},
	}
	for i, s := range steps {
		vm, err := m.ChangeState(ctx, "v", s.req)
		if s.wantErr != nil {
			if !errors.Is(err, s.wantErr) || !strings.Contains(err.Error(), s.errSubstr) {
				t.Fatalf("step %d %+v: err %v, want %v containing %q", i, s.req, err, s.wantErr, s.errSubstr)
			}
		} else if err != nil {
			t.Fatalf("step %d %+v: %v", i, s.req, err)
		}
		got, _ := m.Get(ctx, "v")
		if got.State != s.want {
			t.Fatalf("step %d %+v: state %s (answer %s), want %s", i, s.req, got.State, vm.State, s.want)
		}
	}
	if !strings.Contains(h.callsString(), "discard v") {
		t.Fatalf("discard-state did not reach the host: %v", h.callsString())
	}
}

func TestFailedSuspendKeepsRunning(t *testing.T) {
	m, h := newTestManager(t)
	ctx := context.Background()
	mustCreate(t, m, "v", true)
	h.fail("suspend", errors.New("write state: no space left on device"))
	_, err := m.ChangeState(ctx, "v", api.VMStateRequest{Action: api.ActionPause, ToDisk: true})
	if err == nil || !strings.Contains(err.Error(), "keeps running") || !strings.Contains(err.Error(), "no space") {
		t.Fatalf("err = %v", err)
	}
	if vm, _ := m.Get(ctx, "v"); vm.State != api.StateRunning {
		t.Fatalf("state %s after a failed suspend, want running", vm.State)
	}
}

func TestBadStateResumeStaysSuspended(t *testing.T) {
	m, h := newTestManager(t)
	ctx := context.Background()
	mustCreate(t, m, "v", true)
	if _, err := m.ChangeState(ctx, "v", api.VMStateRequest{Action: api.ActionPause, ToDisk: true}); err != nil {
		t.Fatal(err)
	}
	h.fail("resume", fmt.Errorf("%w: state file /x/state.vigil is corrupt", hostproto.ErrBadState))
	_, err := m.ChangeState(ctx, "v", api.VMStateRequest{Action: api.ActionResume})
	if !errors.Is(err, ErrConflict) || !strings.Contains(err.Error(), "/x/state.vigil") || !strings.Contains(err.Error(), "--discard-state") {
		t.Fatalf("err = %v", err)
	}
	if status, _ := statusOf(err); status != 409 {
		t.Fatalf("status %d, want 409", status)
	}
	if vm, _ := m.Get(ctx, "v"); vm.State != api.StateSuspended {
		t.Fatalf("state %s, want suspended", vm.State)
	}
}

func TestDesiredView(t *testing.T) {
	run := hostproto.VMStatus{Running: true, RunState: "running"}
	paused := hostproto.VMStatus{Running: true, RunState: "paused"}
	saved := hostproto.VMStatus{SavedState: true}
	none := hostproto.VMStatus{}
	tests := []struct {
		desired string
		state   api.VMState
		act     hostproto.VMStatus
		want    api.VMState
	}{
		{desiredRunning, api.StateRunning, run, api.StateRunning},
		{desiredRunning, api.StateRunning, paused, api.StatePaused},
		{desiredRunning, api.StateRunning, none, api.StateCrashed},
		{desiredRunning, api.StateFailed, none, api.StateFailed},
		{desiredRunning, api.StateCrashed, run, api.StateCrashed}, // a hung guest's qemu still runs
		{desiredRunning, api.StateFailed, run, api.StateFailed},
		{desiredPaused, api.StatePaused, paused, api.StatePaused},
		{desiredPaused, api.StatePaused, none, api.StateCrashed},
		{desiredStopped, api.StateStopped, none, api.StateStopped},
		{desiredStopped, api.StateRunning, run, api.StateStopping},
		{desiredSuspended, api.StateSuspended, saved, api.StateSuspended},
		{desiredSuspended, api.StateSuspended, none, api.StateCrashed},
		{desiredSuspended, api.StateSuspended, run, api.StateStopping},
	}
	for _, tt := range tests {
		r := record{Desired: tt.desired, State: tt.state}
		if got := desiredView(r, tt.act); got != tt.want {
			t.Fatalf("desired %s, state %s, actual %+v: got %s, want %s", tt.desired, tt.state, tt.act, got, tt.want)
		}
	}
}

func TestSnapshotTreeBookkeeping(t *testing.T) {
	m, h := newTestManager(t)
	ctx := context.Background()
	mustCreate(t, m, "v", true)
	take := func(name string) {
		t.Helper()
		if _, err := m.CreateSnapshot(ctx, "v", api.SnapshotCreateRequest{Name: name}); err != nil {
			t.Fatalf("snapshot %s: %v", name, err)
		}
	}
	parents := func() map[string]string {
		l, err := m.ListSnapshots(ctx, "v")
		if err != nil {
			t.Fatal(err)
		}
		p := map[string]string{}
		for _, s := range l.Snapshots {
			p[s.Name] = s.Parent
			if s.Current {
				p["<current>"] = s.Name
			}
		}
		return p
	}
	take("a")
	take("b")
	if _, err := m.RevertSnapshot(ctx, "v", "a"); err != nil {
		t.Fatal(err)
	}
	take("c")
	if got := parents(); got["a"] != "" || got["b"] != "a" || got["c"] != "a" || got["<current>"] != "c" {
		t.Fatalf("tree = %v", got)
	}
	if _, err := m.CreateSnapshot(ctx, "v", api.SnapshotCreateRequest{Name: "b"}); !errors.Is(err, ErrConflict) {
		t.Fatalf("duplicate snapshot: %v", err)
	}
	if _, err := m.RevertSnapshot(ctx, "v", "zz"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unknown snapshot: %v", err)
	}
	if err := m.DeleteSnapshot(ctx, "v", "a"); err != nil {
		t.Fatal(err)
	}
	if got := parents(); got["b"] != "" || got["c"] != "" || got["<current>"] != "c" {
		t.Fatalf("after deleting the middle snapshot: %v", got)
	}
	if err := m.Delete(ctx, "v", false); !errors.Is(err, ErrConflict) || !strings.Contains(err.Error(), "--force") {
		t.Fatalf("delete with snapshots: %v", err)
	}
	if err := m.Delete(ctx, "v", true); err != nil {
		t.Fatal(err)
	}
	// The name is reusable and starts with no snapshots.
	mustCreate(t, m, "v", false)
	if l, _ := m.ListSnapshots(ctx, "v"); len(l.Snapshots) != 0 {
		t.Fatalf("a new vm inherited snapshots: %+v", l.Snapshots)
	}
	// A failed snapshot on the host leaves no record.
	h.fail("snapshot", errors.New("disk full"))
	if _, err := m.CreateSnapshot(ctx, "v", api.SnapshotCreateRequest{Name: "x"}); err == nil {
		t.Fatal("failed snapshot reported success")
	}
	if l, _ := m.ListSnapshots(ctx, "v"); len(l.Snapshots) != 0 {
		t.Fatalf("failed snapshot left a record: %+v", l.Snapshots)
	}
}
