package manager

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/hostproto"
	"github.com/vigil-project/vigil/internal/store"
)

// DefaultHostDeadAfter is how long a host may miss heartbeats before the
// leader declares it dead. It must exceed a host's fencing time by at least
// fenceMargin: by then a host that is alive but cut off has killed its VMs.
const DefaultHostDeadAfter = 8 * time.Second

// fenceMargin covers a heartbeat in flight and the time to kill QEMUs.
const fenceMargin = 2 * time.Second

// deathCheck is how often the leader looks for hosts gone silent, so a
// death is declared at most this long after deadAfter. It reads only the
// hosts' heard times, in memory.
const deathCheck = 100 * time.Millisecond

// failoverPass is how often the leader walks the VM records: failovers
// to finish, and the protection pass.
const failoverPass = 500 * time.Millisecond

// WatchHostFailures declares hosts dead when their heartbeats stop, and
// puts the VMs of dead hosts (and those still starting on a new one) on the
// work queue, where Reconcile moves and starts them; then it runs the
// protection pass on the same records; until ctx ends. A death is acted on
// at once, not at the next pass. Only the leader runs it.
func (m *Manager) WatchHostFailures(ctx context.Context) {
	check := time.NewTicker(deathCheck)
	defer check.Stop()
	pass := time.NewTicker(failoverPass)
	defer pass.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-check.C:
			if m.detectDeaths(ctx) == 0 {
				continue
			}
		case <-pass.C:
		}
		rs, err := m.cachedRecords(ctx)
		if err != nil {
			continue
		}
		for _, s := range rs {
			if s.rec.Failover != nil || m.hostState(s.rec.Host) == "dead" {
				m.queue.AddUrgent(s.rec.Spec.Name)
			}
		}
		m.protectionPass(ctx, rs)
	}
}

// detectDeaths declares dead every host this manager has not heard from
// for longer than deadAfter, on the monotonic clock (a step of the wall
// clock declares nobody dead), and says how many it declared. A manager
// that has just become leader first gives every host that long to report.
func (m *Manager) detectDeaths(ctx context.Context) int {
	grace := m.leadingFor()
	declared := 0
	for _, e := range m.hosts.entries() {
		if !e.deadAt.IsZero() {
			continue
		}
		if min(time.Since(e.h.HeardAt()), grace) <= m.deadAfter || time.Since(e.declareFailed) < failoverPass {
			continue
		}
		if ok, err := m.declareDead(ctx, e); err != nil {
			// Try again a pass later, not every check: a store that
			// refuses now is unlikely to accept in 100 ms.
			m.setDeclareFailed(e.h.Name(), time.Now())
			m.log.Error("declare host dead", "host", e.h.Name(), "err", err)
		} else if ok {
			declared++
		}
	}
	return declared
}

// declareDead records the death in the store (so every manager, and the
// host when it comes back, learns of it) before any VM moves. It succeeds
// only if the host's stored liveness is still the one this manager last
// applied: a heartbeat another manager took meanwhile means it lives.
func (m *Manager) declareDead(ctx context.Context, e hostEntry) (bool, error) {
	name := e.h.Name()
	var rec hostRecord
	rev, err := m.store.Get(ctx, "hosts/"+name, &rec)
	if errors.Is(err, store.ErrNotFound) {
		return false, nil // an in-process host has no record, and never dies alone
	}
	if err != nil {
		return false, err
	}
	var seen hostSeenRecord
	srev, err := m.store.Get(ctx, "hostseen/"+name, &seen)
	switch {
	case errors.Is(err, store.ErrNotFound):
		srev = 0
	case err != nil:
		return false, err
	case srev != e.seenRev:
		m.applySeen(name, srev, seen.Seen) // news this manager had not seen: alive
		return false, nil
	}
	now := time.Now().UTC()
	rec.DeadAt, rec.LastHeartbeat = &now, seen.Seen
	if err := m.store.PutIfBoth(ctx, "hosts/"+name, rev, rec, "hostseen/"+name, srev); errors.Is(err, store.ErrConflict) {
		return false, nil // a heartbeat (or a re-registration) came in first
	} else if err != nil {
		return false, err
	}
	m.setDead(name, now)
	silent := time.Since(e.h.HeardAt()).Round(100 * time.Millisecond)
	m.log.Warn("host declared dead", "host", name, "last_heartbeat", seen.Seen, "silent", silent)
	m.publish(api.Event{Type: "host.dead", Host: name,
		Message: fmt.Sprintf("no heartbeat for %s; its vms move to other hosts", silent)})
	return true, nil
}

// hostCallTimeout bounds one call to a host during a failover.
const hostCallTimeout = 30 * time.Second

// hostDeath is what the store says about a dead host.
func (m *Manager) hostDeath(ctx context.Context, name string) (hostRecord, bool) {
	var rec hostRecord
	if _, err := m.store.Get(ctx, "hosts/"+name, &rec); err != nil || rec.DeadAt == nil {
		return rec, false
	}
	return rec, true
}

// evacuate moves one VM off its dead host: a new host of its pool takes
// the lease, and a VM that should run is marked for restart there
// (finishFailover starts it, on the next pass).
func (m *Manager) evacuate(ctx context.Context, o *vmOp) error {
	r := &o.r
	name := r.Spec.Name
	if r.Failover != nil {
		// Moved here, and this host died too before the VM started: move
		// it again (with a new incident).
		m.appendTimeline(ctx, name, r.Failover.Incident, api.TimelineEntry{Time: time.Now().UTC(), Event: "new host died", Detail: "host " + r.Host + " died before the vm started there"})
		r.Failover = nil
	}
	death, dead := m.hostDeath(ctx, r.Host)
	if !dead {
		return o.release(ctx)
	}
	wantRun := (r.Desired == desiredRunning || r.Desired == desiredPaused) && r.State != api.StateFailed
	if r.Spec.Pool == "" {
		// Its disk died with the host: nothing can start it elsewhere.
		if r.Stranded {
			return o.release(ctx)
		}
		r.Stranded = true
		state := r.State
		if wantRun {
			state = api.StateCrashed
		}
		return o.finish(ctx, state, fmt.Sprintf("host %s is dead and this vm's disk is on that host's local storage: it comes back with the host", r.Host))
	}
	// A protected VM continues on its secondary from the last committed
	// checkpoint, if the secondary is up and has one of the run that died.
	p := r.Protection
	standby := wantRun && p != nil && p.Secondary != "" && p.Run != "" && m.hostState(p.Secondary) == "up"
	pin := ""
	if standby {
		pin = p.Secondary
	}
	// Room is held on the target from placement until the record says
	// the VM is there: VMs evacuated at once each see the others'.
	target, err := m.placeElsewhere(ctx, *r, pin)
	if err != nil && standby {
		m.log.Warn("the secondary cannot take its vm; restarting it elsewhere", "vm", name, "secondary", pin, "err", err)
		standby = false
		target, err = m.placeElsewhere(ctx, *r, "")
	}
	defer m.arrived(name)
	if err != nil {
		state := r.State
		if wantRun {
			state = api.StateCrashed
		}
		return o.finish(ctx, state, fmt.Sprintf("host %s is dead; waiting for a host that can take this vm: %v", r.Host, err))
	}
	if p != nil && !standby {
		// A new primary restarts the VM: the standby (of the dead run)
		// is of no use, and a new pairing begins.
		p.Generation++
		p.Run = ""
		if p.Secondary == target {
			p.Secondary = ""
		}
	}
	// The new epoch goes to the pool's owner file before the record moves:
	// from then on the old host can neither start nor keep the VM.
	spec := r.Spec
	spec.Epoch++
	spec.NICs = m.nicsOn(spec.NICs, target)
	actx, cancel := context.WithTimeout(ctx, hostCallTimeout)
	_, err = hostproto.Attach.Call(actx, m.hostNamed(target), spec)
	cancel()
	if err != nil {
		return fmt.Errorf("attach %s to %s: %w", name, target, err)
	}
	m.stepHook(opFailover + "/attach")
	from := r.Host
	r.Spec, r.Host, r.Stranded = spec, target, false
	o.publish(api.Event{Type: "vm.relocated", VM: name, Host: target, Message: "from dead host " + from})
	// Protection asked for continuity: it does not wait for a user.
	restart := wantRun && (withDefaults(r.Policy).Recovery == "restart" || standby)
	if !restart {
		msg := fmt.Sprintf("moved from dead host %s", from)
		if wantRun {
			msg += "; recovery is off: start it with 'vigil vm start " + name + "'"
			return o.finish(ctx, api.StateCrashed, msg)
		}
		state := r.State
		if state == api.StateRunning || state == api.StatePaused || state == api.StateStopping || state == api.StateStarting {
			state = api.StateStopped
		}
		return o.finish(ctx, state, msg)
	}
	// A paused guest's memory died with its host: it comes back running.
	r.Desired = desiredRunning
	fence := time.Duration(death.FenceAfterMS) * time.Millisecond
	action := "restart on " + target
	if standby {
		action = "continue on " + target + " from its last checkpoint"
	}
	inc := api.Incident{ID: incidentID(*death.DeadAt), VM: name, Kind: hostproto.IncidentHostFailure, Host: from,
		DetectedAt: *death.DeadAt, Action: action,
		Evidence: api.Evidence{LastHeartbeat: &death.LastHeartbeat,
			HeartbeatSilenceS: death.DeadAt.Sub(death.LastHeartbeat).Seconds(),
			Detail:            fmt.Sprintf("host %s stopped sending heartbeats", from)},
		Timeline: []api.TimelineEntry{
			{Time: death.LastHeartbeat, Event: "last heartbeat", Detail: "from host " + from},
			{Time: death.LastHeartbeat.Add(fence), Event: "fenced", Detail: fmt.Sprintf("host %s kills its vms after %s without a manager, if it still runs", from, fence)},
			{Time: *death.DeadAt, Event: "declared dead", Detail: fmt.Sprintf("after %s without a heartbeat", m.deadAfter)},
			{Time: time.Now().UTC(), Event: "moved", Detail: fmt.Sprintf("owner of the disk is now %s (epoch %d)", target, spec.Epoch)},
		}}
	r.Failover = &failover{Incident: inc.ID, From: from, Standby: standby}
	msg := fmt.Sprintf("host %s is dead; restarting on %s", from, target)
	if standby {
		p.State, p.Since, p.Message = protFailingOver, time.Now().UTC(), "to "+target
		o.publish(api.Event{Type: "vm.protection", VM: name, Host: target, Message: protFailingOver + ": to " + target})
		msg = fmt.Sprintf("host %s is dead; continuing on %s from its last checkpoint", from, target)
	}
	// One write moves the record, opens the incident and marks the
	// failover; the same operation then starts the VM on its new host. At
	// a thousand hosts every write to the store is a wait in a queue: a
	// dead host's VMs run sooner for each one saved.
	o.also = append(o.also, store.Also{Key: incidentKey(name, inc.ID), Value: incidentRecord{inc}})
	if err := o.transition(ctx, api.StateRecovering, msg); err != nil {
		return err
	}
	return m.finishFailover(ctx, o)
}

// activateTimeout bounds a standby's activation (the host's own limit for
// the operation).
const activateTimeout = 2 * time.Minute

// failover is a VM's move off a dead host, while it starts on the new one.
type failover struct {
	Incident string `json:"incident"`
	From     string `json:"from"`
	// Refused is the last reason the new host gave for not starting it
	// (e.g. the old copy still holds the disk).
	Refused string `json:"refused,omitempty"`
	// Standby: the new host is the VM's secondary, which continues it
	// from its last checkpoint (cleared if that fails: it restarts then).
	Standby bool `json:"standby,omitempty"`
}

// finishFailover starts the VM on its new host. A refusal is kept and
// retried on the next pass: typically the disk is still locked by a copy
// on a host that is cut off but not yet fenced.
func (m *Manager) finishFailover(ctx context.Context, o *vmOp) error {
	r := &o.r
	name := r.Spec.Name
	if r.Desired != desiredRunning {
		r.Failover = nil
		return o.release(ctx)
	}
	if m.hostState(r.Host) != "up" {
		return o.release(ctx) // the new host is silent too; wait (or it dies and we move again)
	}
	if m.actual(*r).Running {
		return m.closeFailover(ctx, o, "running on "+r.Host)
	}
	if r.Failover.Standby {
		// Loading a big checkpoint takes a while: the host's own limit.
		actx, cancel := context.WithTimeout(ctx, activateTimeout)
		entry, err := m.activateStandby(actx, r)
		cancel()
		if err != nil && !errors.Is(err, hostproto.ErrBadState) {
			// Temporary (the old copy still holds the disk until its host
			// fences itself, a timeout): try again on the next pass.
			if r.Failover.Refused != err.Error() {
				r.Failover.Refused = err.Error()
				m.appendTimeline(ctx, name, r.Failover.Incident, api.TimelineEntry{Time: time.Now().UTC(), Event: "activation refused", Detail: err.Error()})
				return o.finish(ctx, api.StateRecovering, fmt.Sprintf("continuing on %s after host %s died: %v", r.Host, r.Failover.From, err))
			}
			return o.release(ctx)
		}
		if err == nil {
			from, id := r.Failover.From, r.Failover.Incident
			r.Failover = nil
			o.publish(api.Event{Type: "vm.protection", VM: name, Host: r.Host, Message: r.Protection.State + ": " + r.Protection.Message})
			if err := o.finish(ctx, api.StateRunning, fmt.Sprintf("continued on %s from its last checkpoint after host %s died", r.Host, from)); err != nil {
				return err
			}
			m.appendTimeline(ctx, name, id, entry) // after: the record says running first
			return nil
		}
		m.appendTimeline(ctx, name, r.Failover.Incident, entry)
		m.log.Warn("standby not usable; restarting the vm", "vm", name, "host", r.Host, "err", err)
		r.Failover.Standby = false
		if r.Protection != nil {
			r.Protection.Secondary, r.Protection.Run, r.Protection.Lost = "", "", true
		}
	}
	sctx, cancel := context.WithTimeout(ctx, hostCallTimeout)
	_, err := hostproto.Start.Call(sctx, m.hostNamed(r.Host), hostproto.VMRef{VM: name})
	cancel()
	if err != nil {
		if r.Failover.Refused != err.Error() {
			r.Failover.Refused = err.Error()
			m.appendTimeline(ctx, name, r.Failover.Incident, api.TimelineEntry{Time: time.Now().UTC(), Event: "start refused", Detail: err.Error()})
			return o.finish(ctx, api.StateRecovering, fmt.Sprintf("restarting on %s after host %s died: %v", r.Host, r.Failover.From, err))
		}
		return o.release(ctx)
	}
	r.OpenIncident = r.Failover.Incident
	return m.closeFailover(ctx, o, "restarted on "+r.Host)
}

// closeFailover records the end of a failover: the record first (the VM
// shows as running as soon as it does), then its incident's timeline.
func (m *Manager) closeFailover(ctx context.Context, o *vmOp, what string) error {
	r := &o.r
	step := api.TimelineEntry{Time: time.Now().UTC(), Event: "restarted", Detail: what}
	from, id := r.Failover.From, r.Failover.Incident
	r.Failover = nil
	if err := o.finish(ctx, api.StateRunning, fmt.Sprintf("restarted on %s after host %s died", r.Host, from)); err != nil {
		return err
	}
	m.appendTimeline(ctx, r.Spec.Name, id, step)
	return nil
}

// onOldCopy records on the VM's latest host-failure incident what its old
// host did with its copy once it could act again (fenced it, dropped it):
// the real end of the old copy, next to the deadline the timeline assumed.
func (m *Manager) onOldCopy(ctx context.Context, e hostproto.Event) {
	kvs, err := m.store.List(ctx, "incidents/"+e.VM+"/")
	if err != nil {
		return
	}
	for i := len(kvs) - 1; i >= 0; i-- {
		var rec incidentRecord
		if json.Unmarshal(kvs[i].Value, &rec) != nil || rec.Kind != hostproto.IncidentHostFailure || rec.Host != e.Host {
			continue
		}
		what := "old copy killed"
		if e.Kind == hostproto.EventDropped {
			what = "old copy dropped"
		}
		m.appendTimeline(ctx, e.VM, rec.ID, api.TimelineEntry{Time: e.Time, Event: what, Detail: "by host " + e.Host + ": " + e.Message})
		return
	}
}

// appendTimeline adds a step to an incident's timeline.
// The timeline is kept in time order.
func (m *Manager) appendTimeline(ctx context.Context, vm, id string, e api.TimelineEntry) {
	m.updateIncident(ctx, vm, id, func(rec *incidentRecord) {
		rec.Timeline = append(rec.Timeline, e)
		sort.SliceStable(rec.Timeline, func(i, j int) bool { return rec.Timeline[i].Time.Before(rec.Timeline[j].Time) })
	})
}

// updateIncident applies change to an incident and saves it. Updates come
// from several goroutines (and managers): a conflicting write is retried on
// the fresh record.
func (m *Manager) updateIncident(ctx context.Context, vm, id string, change func(*incidentRecord)) (incidentRecord, error) {
	var err error
	for attempt := 0; attempt < 10; attempt++ {
		var rec incidentRecord
		rev, gerr := m.store.Get(ctx, incidentKey(vm, id), &rec)
		if gerr != nil {
			return rec, gerr
		}
		change(&rec)
		if _, err = m.store.Update(ctx, incidentKey(vm, id), rev, rec); err == nil {
			return rec, nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	m.log.Warn("update incident", "vm", vm, "err", err)
	return incidentRecord{}, err
}
