package manager

import (
	"context"
	"errors"
	"net"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/hostproto"
)

// staleMigration is how long a live migration may take before other
// managers' controllers act on the VM again (the manager running it died).
const staleMigration = 15 * time.Minute

// staleCreate is how long a "creating" record may sit with no operation in
// progress before the controller decides its creator died and cleans up.
const staleCreate = time.Minute

// Run reconciles every VM now and then every interval, until ctx ends. It is
// level-based: each pass compares desired with actual state and acts, so a
// missed event or a manager restart in the middle of an operation converges.
func (m *Manager) Run(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		m.ReconcileAll(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// ReconcileAll runs one pass over every VM.
func (m *Manager) ReconcileAll(ctx context.Context) {
	rs, err := m.records(ctx)
	if err != nil {
		m.log.Warn("reconcile: list vms", "err", err)
		return
	}
	for _, r := range rs {
		if err := m.Reconcile(ctx, r.rec.Spec.Name); err != nil && !errors.Is(err, ErrBusy) {
			m.log.Warn("reconcile", "vm", r.rec.Spec.Name, "err", err)
		}
	}
}

// Reconcile brings one VM's recorded state in line with reality. A VM busy
// with an API operation is left to that operation.
func (m *Manager) Reconcile(ctx context.Context, name string) error {
	unlock, err := m.lock(name)
	if err != nil {
		return err
	}
	defer unlock()
	r, rev, err := m.load(ctx, name)
	if errors.Is(err, ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	if r.State == api.StateMigrating && time.Since(r.UpdatedAt) < staleMigration {
		return nil // the manager running the migration records its outcome
	}
	if m.hostNamed(r.Host).Info().State != "up" || r.Failover != nil {
		// What a silent host last said may be stale: act on nothing until
		// it reports again. Host failures are WatchHostFailures' to handle.
		return nil
	}
	act := m.actual(r)
	if r.Stranded {
		// Its host is back. Local VMs are not fenced, so it may still run;
		// if it does not, start it again where its disk is, under its policy.
		r.Stranded = false
		if (r.Desired == desiredRunning || r.Desired == desiredPaused) && !act.Running && r.State != api.StateFailed {
			m.recoverLocked(ctx, &r, rev, hostproto.Incident{Kind: hostproto.IncidentHostFailure, DetectedAt: time.Now().UTC(),
				Evidence: hostproto.Evidence{Detail: "its host was dead and came back; the vm's disk is local to it"}})
			return nil
		}
		rev, err = m.save(ctx, &r, rev)
		if err != nil {
			return err
		}
	}
	switch r.State {
	case api.StateCreating:
		if time.Since(r.UpdatedAt) > staleCreate {
			m.log.Warn("cleaning up a create that never finished", "vm", name)
			return m.delete(ctx, &r, rev)
		}
		return nil
	case api.StateDeleting:
		return m.delete(ctx, &r, rev)
	}
	want := desiredView(r, act)
	if want == api.StateStopping && r.Desired == desiredSuspended {
		m.log.Warn("ending a qemu whose state was already saved", "vm", name)
		if err := m.hostNamed(r.Host).Stop(ctx, name, true, 0); err != nil {
			return err
		}
		_, err := m.setState(ctx, &r, rev, api.StateSuspended, r.Message)
		return err
	}
	if want == api.StateStopping {
		// Desired stopped but QEMU runs: an interrupted stop. Finish it.
		_, err := m.stop(ctx, &r, rev, false, DefaultStopTimeout)
		return err
	}
	if want == api.StateCrashed && (r.State == api.StateRunning || r.State == api.StatePaused || r.State == api.StateRecovering) {
		// It was running and is gone (e.g. it died while the agent was
		// down): a crash like any other, under the VM's policy.
		m.recoverLocked(ctx, &r, rev, hostproto.Incident{Kind: hostproto.IncidentExit, DetectedAt: time.Now().UTC(),
			Evidence: hostproto.Evidence{Detail: "qemu was found not running"}})
		return nil
	}
	if want != r.State {
		msg := ""
		if want == api.StateCrashed {
			msg = "qemu was found not running"
			if r.Desired == desiredSuspended {
				msg = "its saved state file is missing"
			}
			if r.Message != "" && r.State == api.StateCrashed {
				msg = r.Message
			}
		}
		_, err := m.setState(ctx, &r, rev, want, msg)
		return err
	}
	return nil
}

// desiredView is the state a VM should show given what it should be doing
// and what its host reports.
func desiredView(r record, act hostproto.VMStatus) api.VMState {
	switch {
	case r.Desired == desiredSuspended && !act.Running && act.SavedState:
		return api.StateSuspended
	case r.Desired == desiredSuspended && act.Running:
		// The state was saved but QEMU was not ended (the agent died in
		// between): the file is the truth, the process must go.
		return api.StateStopping
	case r.Desired == desiredSuspended:
		return api.StateCrashed // the saved state is gone
	case (r.Desired == desiredRunning || r.Desired == desiredPaused) && act.Running:
		if act.RunState == "paused" {
			return api.StatePaused
		}
		return api.StateRunning
	case (r.Desired == desiredRunning || r.Desired == desiredPaused) && !act.Running:
		if r.State == api.StateFailed {
			return api.StateFailed
		}
		return api.StateCrashed
	case r.Desired == desiredStopped && act.Running:
		return api.StateStopping
	default:
		return api.StateStopped
	}
}

// HandleHostEvent turns what a host reports into state changes and events.
// It is the fast path; Reconcile would reach the same result on its next pass.
func (m *Manager) HandleHostEvent(e hostproto.Event) {
	ev := api.Event{Time: e.Time, VM: e.VM, Host: e.Host, Message: e.Message}
	switch e.Kind {
	case hostproto.EventGuestReady:
		ev.Type = "vm.guest-ready"
	case hostproto.EventStarted:
		ev.Type = "vm.started"
	case hostproto.EventAdopted:
		ev.Type = "vm.adopted"
	case hostproto.EventRunState:
		ev.Type = "vm.run-state"
	case hostproto.EventExited:
		ev.Type = "vm.exited"
		if !e.Expected {
			ev.Type = "vm.crashed"
		}
	case hostproto.EventIncident:
		ev.Type = "vm.crashed"
		if e.Incident != nil && e.Incident.Kind == hostproto.IncidentHang {
			ev.Type = "vm.hung"
		}
	case hostproto.EventHealth:
		ev.Type = "vm.health"
	default:
		ev.Type = "vm." + string(e.Kind)
	}
	m.publish(ev)
	switch {
	case e.Incident != nil:
		// Not under the API's lock: an operation in progress finishes first.
		go m.onIncident(e)
	case e.Kind == hostproto.EventExited:
		// The operation that stops a VM records its own result; this
		// catches a guest that powered itself off.
		go m.onExit(e)
	case e.Kind == hostproto.EventGuestReady:
		go m.onGuestReady(e)
	case e.Kind == hostproto.EventHealth:
		go m.onHealth(e)
	case e.Kind == hostproto.EventFenced || e.Kind == hostproto.EventDropped:
		go m.onOldCopy(e)
	}
}

// onHealth records the guest agent's condition (e.g. agent-unwell).
func (m *Manager) onHealth(e hostproto.Event) {
	cond := ""
	switch e.Message {
	case "agent-unwell":
		cond = "agent-unwell"
	case "healthy":
	default:
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	unlock, err := m.lock(e.VM)
	if err != nil {
		return // an operation is running; the next verdict change will tell
	}
	defer unlock()
	r, rev, err := m.load(ctx, e.VM)
	if err != nil || r.Condition == cond || r.Host != e.Host {
		return
	}
	r.Condition = cond
	m.save(ctx, &r, rev)
}

func (m *Manager) onExit(e hostproto.Event) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// Wait for an operation in progress to finish, then look again.
	unlock, err := m.waitLock(ctx, e.VM)
	if err != nil {
		return
	}
	defer unlock()
	if e.Message != hostproto.MsgGuestPoweredOff {
		return // an exit Vigil caused (stop, restart, revert) is recorded by its operation
	}
	r, rev, err := m.load(ctx, e.VM)
	if err != nil || r.Host != e.Host || r.State == api.StateMigrating || m.actual(r).Running || (r.Desired != desiredRunning && r.Desired != desiredPaused) || !e.Expected {
		return // (an old host's news about a VM that moved is history)
	}
	// The guest powered itself off: that is a stop, not a crash.
	r.Desired = desiredStopped
	m.setState(ctx, &r, rev, api.StateStopped, e.Message)
}

// FreePort asks the kernel for a free loopback port that no VM uses yet.
func FreePort(used map[int]bool) (int, error) {
	for i := 0; i < 100; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return 0, err
		}
		p := l.Addr().(*net.TCPAddr).Port
		l.Close()
		if !used[p] {
			return p, nil
		}
	}
	return 0, errors.New("no free port after 100 tries")
}
