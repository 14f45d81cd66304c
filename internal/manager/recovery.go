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
// VM's recovery policy. It waits for an operation in progress on the VM to
// end first (the operation may explain the event away).
func (m *Manager) onIncident(e hostproto.Event) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	unlock, err := m.waitLock(ctx, e.VM)
	if err != nil {
		m.log.Error("incident not handled: vm stayed busy", "vm", e.VM, "kind", e.Incident.Kind)
		return
	}
	defer unlock()
	r, rev, err := m.load(ctx, e.VM)
	if err != nil || r.Host != e.Host || r.Failover != nil || r.State == api.StateMigrating {
		return // the VM moved: what its old host saw is history
	}
	if r.Desired != desiredRunning {
		return // stopped, paused, suspended or deleted on purpose meanwhile
	}
	act := m.actual(r)
	switch e.Incident.Kind {
	case hostproto.IncidentExit:
		if act.Running {
			return // already started again
		}
	case hostproto.IncidentHang:
		if !act.Running || act.RunState != "running" {
			return
		}
	}
	m.recoverLocked(ctx, &r, rev, *e.Incident)
}

// recoverLocked records inc and applies the policy; the caller holds the lock.
func (m *Manager) recoverLocked(ctx context.Context, r *record, rev int64, inc hostproto.Incident) {
	name := r.Spec.Name
	p := withDefaults(r.Policy)
	rec := incidentRecord{api.Incident{ID: fmt.Sprintf("%019d", inc.DetectedAt.UnixNano()), VM: name, Kind: inc.Kind, Host: r.Host,
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
			m.hostNamed(r.Host).Stop(ctx, name, true, 0)
		}
	default:
		rec.Action = "restart"
	}
	if _, err := m.store.Create(ctx, incidentKey(name, rec.ID), rec); err != nil {
		m.log.Error("record incident", "vm", name, "err", err)
	}
	m.log.Warn("incident", "vm", name, "kind", inc.Kind, "action", rec.Action)
	m.publish(api.Event{Type: "vm.incident", VM: name, Host: r.Host, Message: inc.Kind + ": " + rec.Action})

	if rec.Action != "restart" {
		if state == api.StateFailed {
			r.Desired = desiredRunning // keeps "failed" sticky in the reconciler
		}
		m.setState(ctx, r, rev, state, msg)
		return
	}
	rev, err := m.setState(ctx, r, rev, api.StateRecovering, inc.Kind+" detected; restarting")
	if err != nil {
		return
	}
	r.Restarts = append(r.Restarts, time.Now().UTC())
	r.OpenIncident = rec.ID
	if err := m.hostNamed(r.Host).Restart(ctx, name); err != nil {
		r.OpenIncident = ""
		m.setState(ctx, r, rev, api.StateCrashed, fmt.Sprintf("%s detected; restart failed: %v", inc.Kind, err))
		return
	}
	m.setState(ctx, r, rev, api.StateRunning, fmt.Sprintf("restarted after %s", inc.Kind))
}

// onGuestReady closes a pending incident when its restarted guest is back.
func (m *Manager) onGuestReady(e hostproto.Event) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// Most guest-ready events close nothing: look before taking the lock.
	if r, _, err := m.load(ctx, e.VM); err != nil || r.OpenIncident == "" || r.Host != e.Host {
		m.log.Debug("guest ready: no open incident", "vm", e.VM, "host", e.Host, "record_host", r.Host, "err", err)
		return
	}
	unlock, err := m.waitLock(ctx, e.VM)
	if err != nil {
		return
	}
	r, rev, err := m.load(ctx, e.VM)
	if err != nil || r.OpenIncident == "" || r.Host != e.Host {
		unlock()
		return
	}
	id := r.OpenIncident
	r.OpenIncident = ""
	_, err = m.save(ctx, &r, rev)
	unlock()
	if err != nil {
		m.log.Warn("close incident", "vm", e.VM, "err", err)
		return
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
		m.log.Error("record recovery", "vm", e.VM, "err", err)
		return
	}
	m.publish(api.Event{Type: "vm.recovered", VM: e.VM, Host: e.Host,
		Message: fmt.Sprintf("%s: guest back %.0f ms after detection", rec.Kind, rec.RecoveredInMS)})
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
	r, rev, unlock, err := m.lockLoad(ctx, name)
	if err != nil {
		return api.VM{}, err
	}
	defer unlock()
	r.Policy = p
	if err := m.hostNamed(r.Host).SetHealth(name, p.HangTimeoutSeconds, p.MinUptimeSeconds); err != nil {
		return api.VM{}, fmt.Errorf("set policy of %s: %w", name, err)
	}
	if _, err := m.save(ctx, &r, rev); err != nil {
		return api.VM{}, err
	}
	m.publish(api.Event{Type: "vm.policy", VM: name, Host: r.Host})
	return m.view(r), nil
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
	if err := m.hostNamed(vm.Host).Fault(ctx, name, kind); err != nil {
		return fmt.Errorf("fault %s in vm %s: %w", kind, name, err)
	}
	m.publish(api.Event{Type: "vm.fault", VM: name, Host: vm.Host, Message: kind})
	return nil
}
