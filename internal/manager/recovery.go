package manager

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/hostproto"
)

// Policy defaults.
const (
	defaultRecovery      = "restart"
	defaultHangTimeout   = 10
	defaultMinUptime     = 30
	defaultMaxRestarts   = 3
	defaultRestartWindow = 3600
)

// withDefaults fills the zero fields of p.
func withDefaults(p api.RecoveryPolicy) api.RecoveryPolicy {
	if p.Recovery == "" {
		p.Recovery = defaultRecovery
	}
	if p.HangTimeoutSeconds == 0 {
		p.HangTimeoutSeconds = defaultHangTimeout
	}
	if p.MinUptimeSeconds == 0 {
		p.MinUptimeSeconds = defaultMinUptime
	}
	if p.MaxRestarts == 0 {
		p.MaxRestarts = defaultMaxRestarts
	}
	if p.RestartWindowSeconds == 0 {
		p.RestartWindowSeconds = defaultRestartWindow
	}
	return p
}

func validatePolicy(p api.RecoveryPolicy) error {
	switch {
	case p.Recovery != "" && p.Recovery != "restart" && p.Recovery != "none":
		return errorf(ErrInvalid, "unknown recovery %q: use restart or none", p.Recovery)
	case p.HangTimeoutSeconds < 0 || p.HangTimeoutSeconds > 3600:
		return errorf(ErrInvalid, "hang timeout %ds is out of range: use 1-3600 seconds", p.HangTimeoutSeconds)
	case p.HangTimeoutSeconds > 0 && p.HangTimeoutSeconds < 2:
		return errorf(ErrInvalid, "hang timeout %ds is too short to tell a hang from a busy moment: use at least 2 seconds", p.HangTimeoutSeconds)
	case p.MinUptimeSeconds < 0 || p.MinUptimeSeconds > 86400:
		return errorf(ErrInvalid, "minimum uptime %ds is out of range: use 0-86400 seconds", p.MinUptimeSeconds)
	case p.MaxRestarts < 0 || p.MaxRestarts > 1000:
		return errorf(ErrInvalid, "max restarts %d is out of range: use 1-1000", p.MaxRestarts)
	case p.RestartWindowSeconds < 0 || p.RestartWindowSeconds > 7*86400:
		return errorf(ErrInvalid, "restart window %ds is out of range: use up to a week", p.RestartWindowSeconds)
	}
	return nil
}

// incidentRecord is an incident as stored under "incidents/<vm>/<id>".
type incidentRecord struct {
	api.Incident
}

func incidentKey(vm, id string) string { return "incidents/" + vm + "/" + id }

func toAPIEvidence(e hostproto.Evidence) api.Evidence {
	out := api.Evidence{HeartbeatSilenceS: e.HeartbeatSilenceS, ActivitySilenceS: e.ActivitySilenceS, CPUTimeMS: e.CPUTimeMS,
		DiskOps: e.DiskOps, RunState: e.RunState, Detail: e.Detail, Console: e.Console}
	if !e.LastHeartbeat.IsZero() {
		t := e.LastHeartbeat
		out.LastHeartbeat = &t
	}
	return out
}

// onIncident records a crash or hang reported by a host and applies the
// VM's recovery policy. An incident that is history by the time it is
// handled (the VM moved, was stopped, or is already running again) changes
// nothing; one handled before (a retry) is not handled twice.
func (m *Manager) onIncident(ctx context.Context, e hostproto.Event) error {
	inc := *e.Incident
	o, err := m.beginFor(ctx, e.VM, opRecover, func(o *vmOp) error {
		r := o.r
		if r.Host != e.Host || r.Failover != nil || r.State == api.StateMigrating {
			return errNothing // the VM moved: what its old host saw is history
		}
		if r.Desired != desiredRunning {
			return errNothing // stopped, paused, suspended or deleted on purpose meanwhile
		}
		act := m.actual(r)
		switch inc.Kind {
		case hostproto.IncidentExit:
			if act.Running {
				return errNothing // already started again
			}
		case hostproto.IncidentHang:
			if !act.Running || act.RunState != "running" {
				return errNothing
			}
		}
		var seen incidentRecord
		if _, err := m.store.Get(ctx, incidentKey(e.VM, incidentID(inc.DetectedAt)), &seen); err == nil {
			return errNothing
		}
		return nil
	})
	if o == nil || err != nil {
		return err
	}
	defer o.end(ctx)
	m.recoverVM(ctx, o, inc)
	return nil
}

func incidentID(t time.Time) string { return fmt.Sprintf("%019d", t.UnixNano()) }

// recoverVM records inc and applies the policy, ending the operation.
func (m *Manager) recoverVM(ctx context.Context, o *vmOp, inc hostproto.Incident) {
	r := &o.r
	name := r.Spec.Name
	p := withDefaults(r.Policy)
	rec := incidentRecord{api.Incident{ID: incidentID(inc.DetectedAt), VM: name, Kind: inc.Kind, Host: r.Host,
		DetectedAt: inc.DetectedAt, Evidence: toAPIEvidence(inc.Evidence)}}

	// Keep only the restarts inside the window: that is the budget used.
	window := time.Duration(p.RestartWindowSeconds) * time.Second
	var recent []time.Time
	for _, t := range r.Restarts {
		if time.Since(t) < window {
			recent = append(recent, t)
		}
	}
	r.Restarts = recent

	var state api.VMState
	var msg string
	h := m.hostNamed(r.Host)
	switch {
	case p.Recovery == "none":
		rec.Action = "none"
		state, msg = api.StateCrashed, fmt.Sprintf("%s detected; recovery is off (see 'vigil vm incidents %s')", inc.Kind, name)
	case len(recent) >= p.MaxRestarts:
		rec.Action = "gave-up"
		state = api.StateFailed
		msg = fmt.Sprintf("%s detected after %d restarts within %s: giving up; see 'vigil vm incidents %s', then start it by hand", inc.Kind, len(recent), window, name)
		// Free the host; the evidence is in the incident.
		if m.actual(*r).Running {
			hostproto.Stop.Call(ctx, h, hostproto.StopRequest{VM: name, Force: true})
		}
	default:
		rec.Action = "restart"
	}
	if _, err := m.store.Create(ctx, incidentKey(name, rec.ID), rec); err != nil {
		m.log.Error("record incident", "vm", name, "err", err)
	}
	m.log.Warn("incident", "vm", name, "kind", inc.Kind, "action", rec.Action)
	o.publish(api.Event{Type: "vm.incident", VM: name, Host: r.Host, Message: inc.Kind + ": " + rec.Action})

	if rec.Action != "restart" {
		if state == api.StateFailed {
			r.Desired = desiredRunning // keeps "failed" sticky in the reconciler
		}
		o.finish(ctx, state, msg)
		return
	}
	if err := o.transition(ctx, api.StateRecovering, inc.Kind+" detected; restarting"); err != nil {
		return
	}
	r.Restarts = append(r.Restarts, time.Now().UTC())
	r.OpenIncident = rec.ID
	if _, err := hostproto.Restart.Call(ctx, h, hostproto.VMRef{VM: name}); err != nil {
		r.OpenIncident = ""
		o.finish(ctx, api.StateCrashed, fmt.Sprintf("%s detected; restart failed: %v", inc.Kind, err))
		return
	}
	o.finish(ctx, api.StateRunning, fmt.Sprintf("restarted after %s", inc.Kind))
}

// onGuestReady closes a pending incident when its restarted guest is back.
func (m *Manager) onGuestReady(ctx context.Context, e hostproto.Event) error {
	// Most guest-ready events close nothing: look before taking the lock.
	if r, _, err := m.load(ctx, e.VM); err != nil || r.OpenIncident == "" || r.Host != e.Host {
		return nil
	}
	var id string
	o, err := m.beginFor(ctx, e.VM, opEvent, func(o *vmOp) error {
		if o.r.OpenIncident == "" || o.r.Host != e.Host {
			return errNothing
		}
		id = o.r.OpenIncident
		o.r.OpenIncident = ""
		return nil
	})
	if o == nil || err != nil {
		return err
	}
	if err := o.release(ctx); err != nil {
		return err
	}
	t := e.Time
	rec, err := m.updateIncident(ctx, e.VM, id, func(rec *incidentRecord) {
		rec.RecoveredAt = &t
		rec.RecoveredInMS = ms(t.Sub(rec.DetectedAt))
		if len(rec.Timeline) > 0 {
			rec.Timeline = append(rec.Timeline, api.TimelineEntry{Time: t, Event: "guest back", Detail: "first heartbeat from the guest on host " + e.Host})
		}
	})
	if err != nil {
		return fmt.Errorf("record recovery of %s: %w", e.VM, err)
	}
	m.publish(api.Event{Type: "vm.recovered", VM: e.VM, Host: e.Host,
		Message: fmt.Sprintf("%s: guest back %.0f ms after detection", rec.Kind, rec.RecoveredInMS)})
	return nil
}

// Incidents lists a VM's incidents, oldest first.
func (m *Manager) Incidents(ctx context.Context, name string) ([]api.Incident, error) {
	if _, err := m.Get(ctx, name); err != nil {
		return nil, err
	}
	kvs, err := m.store.List(ctx, "incidents/"+name+"/")
	if err != nil {
		return nil, wrapf(ErrUnavailable, err, "list incidents of %s", name)
	}
	out := []api.Incident{}
	for _, kv := range kvs {
		var rec incidentRecord
		if json.Unmarshal(kv.Value, &rec) == nil {
			out = append(out, rec.Incident)
		}
	}
	return out, nil
}

// SetPolicy changes a VM's recovery policy.
func (m *Manager) SetPolicy(ctx context.Context, name string, p api.RecoveryPolicy) (api.VM, error) {
	if err := validName(name); err != nil {
		return api.VM{}, err
	}
	if err := validatePolicy(p); err != nil {
		return api.VM{}, err
	}
	o, err := m.begin(ctx, name, opPolicy, nil)
	if err != nil {
		return api.VM{}, err
	}
	ctx, cancel := detach(ctx)
	defer cancel()
	defer o.end(ctx)
	if _, err := hostproto.SetHealth.Call(ctx, m.hostNamed(o.r.Host), hostproto.HealthRequest{VM: name, HangTimeoutSeconds: p.HangTimeoutSeconds, MinUptimeSeconds: p.MinUptimeSeconds}); err != nil {
		return api.VM{}, fmt.Errorf("set policy of %s: %w", name, err)
	}
	o.r.Policy = p
	o.r.Spec.HangTimeoutSeconds, o.r.Spec.MinUptimeSeconds = p.HangTimeoutSeconds, p.MinUptimeSeconds
	o.publish(api.Event{Type: "vm.policy", VM: name, Host: o.r.Host})
	if err := o.release(ctx); err != nil {
		return api.VM{}, err
	}
	return m.view(o.r), nil
}

// Fault injects a fault into a running VM (a drill).
func (m *Manager) Fault(ctx context.Context, name, kind string) error {
	switch kind {
	case "panic", "hang", "agent-stop", "kill":
	default:
		return errorf(ErrInvalid, "unknown fault %q: use panic, hang, agent-stop or kill", kind)
	}
	vm, err := m.Get(ctx, name)
	if err != nil {
		return err
	}
	if vm.State != api.StateRunning {
		return errorf(ErrConflict, "vm %s is %s: faults are injected into running vms", name, vm.State)
	}
	if kind != "kill" && vm.Guest == nil {
		return errorf(ErrConflict, "vm %s has no connected guest agent to inject %s through: %s", name, kind, errGuestAgentHint)
	}
	if _, err := hostproto.Fault.Call(ctx, m.hostNamed(vm.Host), hostproto.FaultRequest{VM: name, Kind: kind}); err != nil {
		return fmt.Errorf("fault %s in vm %s: %w", kind, name, err)
	}
	m.publish(api.Event{Type: "vm.fault", VM: name, Host: vm.Host, Message: kind})
	return nil
}
