package manager

import (
	"context"
	"errors"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/hostproto"
	"github.com/vigil-project/vigil/internal/workqueue"
)

// staleCreate is how long a "creating" record may sit with no operation in
// progress before the reconciler decides its creator died and cleans up.
const staleCreate = time.Minute

// errNothing ends a begin whose prepare found nothing to do.
var errNothing = errors.New("nothing to do")

// hostEvent is a host event waiting on the work queue; handled marks it
// done, so that a retry of its VM (busy the first time) does not act on it
// twice.
type hostEvent struct {
	e       hostproto.Event
	handled bool
}

// work is what a queue worker does for one VM: act on the host events that
// wait for it, in order, then (on the leader) bring its record in line with
// reality. A busy VM is retried after a backoff.
func (m *Manager) work(ctx context.Context, w workqueue.Work[*hostEvent]) workqueue.Result {
	for _, he := range w.Items {
		if he.handled {
			continue
		}
		err := m.handleEvent(ctx, he.e)
		if errors.Is(err, ErrBusy) {
			return workqueue.Result{Err: err}
		}
		if err != nil && !errors.Is(err, ErrNotFound) {
			m.log.Warn("host event", "vm", w.Key, "kind", he.e.Kind, "err", err)
		}
		he.handled = true
	}
	if w.Dropped > 0 {
		m.log.Warn("host events dropped: too many waiting for one vm", "vm", w.Key, "dropped", w.Dropped)
	}
	if !m.leader.Load() {
		return workqueue.Result{}
	}
	err := m.Reconcile(ctx, w.Key)
	switch {
	case errors.Is(err, ErrBusy):
		return workqueue.Result{Err: err}
	case err != nil && !errors.Is(err, ErrNotFound):
		m.log.Warn("reconcile", "vm", w.Key, "err", err)
	}
	return workqueue.Result{}
}

// settle is what the reconciler found a VM needs.
type settle int

const (
	settleNothing  settle = iota
	settleOrphan          // finish or roll back an operation a dead manager left
	settleEvacuate        // its host is dead: move it
	settleFailover        // moved off a dead host: start it on the new one
	settleUnstrand        // its dead host came back
	settleCreate          // a create whose creator died: clean up
	settleDelete          // an interrupted delete: finish it
	settleEndSaved        // suspended, but its QEMU still runs: end it
	settleStop            // an interrupted stop: finish it
	settleCrashed         // it should run and does not: a crash
	settleState           // only the recorded state is behind reality
)

// Reconcile brings one VM's record in line with reality, level-based: it
// compares what the record wants with what the host reports and acts, so a
// missed event or a manager dying in the middle of an operation converges.
// A VM busy with an operation is left to it.
func (m *Manager) Reconcile(ctx context.Context, name string) error {
	var what settle
	var want api.VMState
	o, err := m.begin(ctx, name, opSettle, func(o *vmOp) error {
		what, want = m.plan(ctx, o)
		if what == settleNothing {
			return errNothing
		}
		return nil
	})
	if errors.Is(err, errNothing) || errors.Is(err, ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	defer o.end(ctx)
	r := &o.r
	switch what {
	case settleOrphan:
		err := m.recoverOrphan(ctx, o)
		if err != nil {
			// Neither finished nor rolled back: keep the intent, try again.
			o.keepIntent = true
			m.queue.AddAfter(name, time.Second)
			return err
		}
		m.queue.Add(name) // look again, level-based, once the intent is gone
		return nil
	case settleEvacuate:
		return m.evacuate(ctx, o)
	case settleFailover:
		return m.finishFailover(ctx, o)
	case settleUnstrand:
		// Its host is back. Local VMs are not fenced, so it may still run;
		// if it does not, start it again where its disk is, under its policy.
		r.Stranded = false
		if (r.Desired == desiredRunning || r.Desired == desiredPaused) && !m.actual(*r).Running && r.State != api.StateFailed {
			m.recoverVM(ctx, o, hostproto.Incident{Kind: hostproto.IncidentHostFailure, DetectedAt: time.Now().UTC(),
				Evidence: hostproto.Evidence{Detail: "its host was dead and came back; the vm's disk is local to it"}})
			return nil
		}
		return o.release(ctx)
	case settleCreate:
		m.log.Warn("cleaning up a create that never finished", "vm", name)
		return m.delete(ctx, o)
	case settleDelete:
		return m.delete(ctx, o)
	case settleEndSaved:
		m.log.Warn("ending a qemu whose state was already saved", "vm", name)
		if _, err := hostproto.Stop.Call(ctx, m.hostNamed(r.Host), hostproto.StopRequest{VM: name, Force: true}); err != nil {
			return err
		}
		return o.finish(ctx, api.StateSuspended, r.Message)
	case settleStop:
		return m.stop(ctx, o, false, DefaultStopTimeout, true)
	case settleCrashed:
		// It was running and is gone (e.g. it died while the agent was
		// down): a crash like any other, under the VM's policy.
		m.recoverVM(ctx, o, hostproto.Incident{Kind: hostproto.IncidentExit, DetectedAt: time.Now().UTC(),
			Evidence: hostproto.Evidence{Detail: "qemu was found not running"}})
		return nil
	case settleState:
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
		return o.finish(ctx, want, msg)
	}
	return nil
}

// plan decides what a VM needs, from its record and what its host reports.
// It only reads.
func (m *Manager) plan(ctx context.Context, o *vmOp) (settle, api.VMState) {
	r := o.r
	if o.orphan != nil {
		if held, _, err := m.store.Held(ctx, lockKey(r.Spec.Name)); err != nil || held {
			return settleNothing, "" // in progress (or we cannot tell)
		}
		return settleOrphan, ""
	}
	what, want, destroys := m.verdict(r, m.actual(r))
	if destroys {
		// About to kill or restart on what a cached report said: ask the
		// host itself first (the cache may lag an operation another
		// manager just made).
		fresh, err := m.freshStatus(ctx, r.Host, r.Spec.Name)
		if err != nil && !errors.Is(err, hostproto.ErrUnknownVM) {
			return settleNothing, ""
		}
		what, want, _ = m.verdict(r, fresh)
	}
	return what, want
}

// verdict is what a VM with record r needs when its host reports act: the
// reconciler's rule, without reading the store or calling a host (plan
// checks a destructive verdict with the host first). The resync pass runs
// it over the cached records to queue only the VMs that need work.
func (m *Manager) verdict(r record, act hostproto.VMStatus) (what settle, want api.VMState, destroys bool) {
	state := m.hostState(r.Host)
	switch {
	case state == "dead" && r.State != api.StateDeleting && r.State != api.StateCreating:
		return settleEvacuate, "", false
	case r.Failover != nil:
		return settleFailover, "", false
	case state != "up":
		// What a silent host last said may be stale: act on nothing until
		// it reports again.
		return settleNothing, "", false
	case r.Stranded:
		return settleUnstrand, "", false
	case r.State == api.StateCreating:
		if time.Since(r.UpdatedAt) > staleCreate {
			return settleCreate, "", false
		}
		return settleNothing, "", false
	case r.State == api.StateDeleting:
		return settleDelete, "", false
	}
	want = desiredView(r, act)
	destroys = destructive(r, want)
	switch {
	case want == api.StateStopping && r.Desired == desiredSuspended:
		return settleEndSaved, "", destroys
	case want == api.StateStopping:
		return settleStop, "", destroys
	case want == api.StateCrashed && (r.State == api.StateRunning || r.State == api.StatePaused || r.State == api.StateRecovering):
		return settleCrashed, "", destroys
	case want != r.State:
		return settleState, want, destroys
	}
	return settleNothing, "", false
}

// destructive tells whether the reconciler would stop or restart the VM.
func destructive(r record, want api.VMState) bool {
	return want == api.StateStopping ||
		want == api.StateCrashed && (r.State == api.StateRunning || r.State == api.StatePaused || r.State == api.StateRecovering)
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
	case (r.Desired == desiredRunning || r.Desired == desiredPaused) && (r.State == api.StateFailed || r.State == api.StateCrashed):
		// A crash that was not (or could not be) recovered stays until a
		// human acts: a hung or panicked guest's QEMU still "runs".
		return r.State
	case (r.Desired == desiredRunning || r.Desired == desiredPaused) && act.Running:
		if act.RunState == "paused" {
			return api.StatePaused
		}
		return api.StateRunning
	case r.Desired == desiredRunning || r.Desired == desiredPaused:
		return api.StateCrashed
	case r.Desired == desiredStopped && act.Running:
		return api.StateStopping
	default:
		return api.StateStopped
	}
}

// HandleHostEvent publishes what a host reports and queues what needs
// acting on; the queue's workers act (handleEvent). It never blocks.
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
	case e.Incident != nil, e.Kind == hostproto.EventExited, e.Kind == hostproto.EventGuestReady,
		e.Kind == hostproto.EventHealth, e.Kind == hostproto.EventFenced, e.Kind == hostproto.EventDropped:
		m.queue.Add(e.VM, &hostEvent{e: e})
	}
}

// handleEvent acts on one host event.
func (m *Manager) handleEvent(ctx context.Context, e hostproto.Event) error {
	switch {
	case e.Incident != nil:
		return m.onIncident(ctx, e)
	case e.Kind == hostproto.EventExited:
		return m.onExit(ctx, e)
	case e.Kind == hostproto.EventGuestReady:
		return m.onGuestReady(ctx, e)
	case e.Kind == hostproto.EventHealth:
		return m.onHealth(ctx, e)
	case e.Kind == hostproto.EventFenced || e.Kind == hostproto.EventDropped:
		m.onOldCopy(ctx, e)
	}
	return nil
}

// beginFor is begin for an event handler: errNothing (the event changes
// nothing) and a VM deleted meanwhile are no errors.
func (m *Manager) beginFor(ctx context.Context, name, kind string, prepare func(o *vmOp) error) (*vmOp, error) {
	o, err := m.begin(ctx, name, kind, prepare)
	if errors.Is(err, errNothing) || errors.Is(err, ErrNotFound) {
		return nil, nil
	}
	return o, err
}

// onHealth records the guest agent's condition (e.g. agent-unwell).
func (m *Manager) onHealth(ctx context.Context, e hostproto.Event) error {
	cond := ""
	switch e.Message {
	case "agent-unwell":
		cond = "agent-unwell"
	case "healthy":
	default:
		return nil
	}
	if r, _, err := m.load(ctx, e.VM); err != nil || r.Condition == cond || r.Host != e.Host {
		return nil // most verdicts change nothing: look before locking
	}
	o, err := m.beginFor(ctx, e.VM, opEvent, func(o *vmOp) error {
		if o.r.Condition == cond || o.r.Host != e.Host {
			return errNothing
		}
		o.r.Condition = cond
		return nil
	})
	if o == nil || err != nil {
		return err
	}
	return o.release(ctx)
}

// onExit catches a guest that powered itself off: that is a stop, not a
// crash. (An exit Vigil caused is recorded by the operation that caused it.)
func (m *Manager) onExit(ctx context.Context, e hostproto.Event) error {
	if e.Message != hostproto.MsgGuestPoweredOff || !e.Expected {
		return nil
	}
	o, err := m.beginFor(ctx, e.VM, opEvent, func(o *vmOp) error {
		r := o.r
		if r.Host != e.Host || r.State == api.StateMigrating || m.actual(r).Running || (r.Desired != desiredRunning && r.Desired != desiredPaused) {
			return errNothing // (an old host's news about a VM that moved is history)
		}
		o.r.Desired = desiredStopped
		return nil
	})
	if o == nil || err != nil {
		return err
	}
	return o.finish(ctx, api.StateStopped, e.Message)
}
