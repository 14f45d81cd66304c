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
	"github.com/vigil-project/vigil/internal/remotehost"
	"github.com/vigil-project/vigil/internal/store"
)

// DefaultHostDeadAfter is how long a host may miss heartbeats before the
// leader declares it dead. It must exceed a host's fencing time by at least
// fenceMargin: by then a host that is alive but cut off has killed its VMs.
const DefaultHostDeadAfter = 8 * time.Second

// fenceMargin covers a heartbeat in flight and the time to kill QEMUs.
const fenceMargin = 2 * time.Second

// failoverPass is how often the leader looks for dead hosts.
const failoverPass = 500 * time.Millisecond

// WatchHostFailures declares hosts dead when their heartbeats stop and
// moves their VMs to other hosts, until ctx ends. Only the leader runs it.
func (m *Manager) WatchHostFailures(ctx context.Context) {
	t := time.NewTicker(failoverPass)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		m.detectDeaths(ctx)
		m.evacuateAll(ctx)
	}
}

// detectDeaths declares dead every host silent for longer than deadAfter.
// Silence is counted from the later of its last heartbeat and the moment
// this manager became leader: a new leader, or a cluster starting after
// downtime, first gives every host the time to report.
func (m *Manager) detectDeaths(ctx context.Context) {
	since := time.Unix(0, m.leaderSince.Load())
	for _, h := range m.remoteHosts() {
		if !h.DeadAt().IsZero() {
			continue
		}
		last := h.Info().LastHeartbeat
		from := last
		if since.After(from) {
			from = since
		}
		if time.Since(from) <= m.deadAfter {
			continue
		}
		if err := m.declareDead(ctx, h, last); err != nil {
			m.log.Error("declare host dead", "host", h.Name(), "err", err)
		}
	}
}

func (m *Manager) remoteHosts() []*remotehost.Host {
	m.hosts.mu.Lock()
	defer m.hosts.mu.Unlock()
	var out []*remotehost.Host
	for _, e := range m.hosts.hosts {
		if h, ok := e.h.(*remotehost.Host); ok {
			out = append(out, h)
		}
	}
	return out
}

// declareDead records the death in the store (so every manager, and the
// host when it comes back, learns of it) before any VM moves.
func (m *Manager) declareDead(ctx context.Context, h *remotehost.Host, last time.Time) error {
	var rec hostRecord
	rev, err := m.store.Get(ctx, "hosts/"+h.Name(), &rec)
	if err != nil {
		return err
	}
	// Judge on the stored status, not this manager's copy of it: another
	// manager may have taken a heartbeat this one has not seen yet.
	var st hostStatusRecord
	srev, err := m.store.Get(ctx, "hoststatus/"+h.Name(), &st)
	switch {
	case errors.Is(err, store.ErrNotFound):
		srev = 0
	case err != nil:
		return err
	case time.Since(st.Seen) <= m.deadAfter:
		h.Seen(st.Seen)
		return nil
	default:
		last = st.Seen
	}
	now := time.Now().UTC()
	rec.DeadAt, rec.LastHeartbeat = &now, last
	// Only if no heartbeat was stored since the status was read (see
	// Heartbeat), and nobody else changed the host's record.
	if err := m.store.PutIfBoth(ctx, "hosts/"+h.Name(), rev, rec, "hoststatus/"+h.Name(), srev); err != nil {
		return err
	}
	h.SetDead(now)
	m.log.Warn("host declared dead", "host", h.Name(), "last_heartbeat", last, "silent", now.Sub(last).Round(time.Millisecond))
	m.publish(api.Event{Type: "host.dead", Host: h.Name(),
		Message: fmt.Sprintf("no heartbeat for %s; its vms move to other hosts", now.Sub(last).Round(100*time.Millisecond))})
	return nil
}

// evacuateAll moves every VM off dead hosts, then starts every VM whose
// failover is under way. It is level-based, so a leader taking over in the
// middle of a failover finishes it. Placement goes one VM at a time (each
// sees the reservations of the ones before); the starts, the slow part,
// go in parallel.
func (m *Manager) evacuateAll(ctx context.Context) {
	rs, err := m.records(ctx)
	if err != nil {
		return
	}
	for _, s := range rs {
		r := s.rec
		if m.hostNamed(r.Host).Info().State != "dead" {
			continue
		}
		if err := m.evacuate(ctx, r.Spec.Name); err != nil && !errors.Is(err, ErrBusy) {
			m.log.Warn("failover", "vm", r.Spec.Name, "err", err)
		}
	}
	if rs, err = m.records(ctx); err != nil {
		return
	}
	// Not waited for: a start that hangs (a frozen new host) must not stop
	// the detection of further deaths. The VM's lock keeps a second pass
	// from starting it again meanwhile.
	for _, s := range rs {
		if s.rec.Failover == nil {
			continue
		}
		go func(name string) {
			if err := m.restartMoved(ctx, name); err != nil && !errors.Is(err, ErrBusy) {
				m.log.Warn("failover", "vm", name, "err", err)
			}
		}(s.rec.Spec.Name)
	}
}

// hostCallTimeout bounds one call to a host during a failover.
const hostCallTimeout = 30 * time.Second

// restartMoved goes on with the failover of one moved VM.
func (m *Manager) restartMoved(ctx context.Context, name string) error {
	r, rev, unlock, err := m.lockLoad(ctx, name)
	if err != nil {
		return err
	}
	defer unlock()
	if r.Failover == nil {
		return nil
	}
	return m.finishFailover(ctx, &r, rev)
}

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
// (restartMoved starts it).
func (m *Manager) evacuate(ctx context.Context, name string) error {
	r, rev, unlock, err := m.lockLoad(ctx, name)
	if err != nil {
		return err
	}
	defer unlock()
	if r.Failover != nil {
		// Moved here, and this host died too before the VM started: move
		// it again (with a new incident).
		m.appendTimeline(ctx, name, r.Failover.Incident, api.TimelineEntry{Time: time.Now().UTC(), Event: "new host died", Detail: "host " + r.Host + " died before the vm started there"})
		r.Failover = nil
	}
	death, dead := m.hostDeath(ctx, r.Host)
	if !dead || r.State == api.StateDeleting || r.State == api.StateCreating {
		return nil
	}
	wantRun := (r.Desired == desiredRunning || r.Desired == desiredPaused) && r.State != api.StateFailed
	if r.Spec.Pool == "" {
		// Its disk died with the host: nothing can start it elsewhere.
		if r.Stranded {
			return nil
		}
		r.Stranded = true
		state := r.State
		if wantRun {
			state = api.StateCrashed
		}
		_, err := m.setState(ctx, &r, rev, state, fmt.Sprintf("host %s is dead and this vm's disk is on that host's local storage: it comes back with the host", r.Host))
		return err
	}
	rs, err := m.records(ctx)
	if err != nil {
		return err
	}
	target, err := place(m.hosts.candidates(rs), need{mem: r.Spec.MemoryBytes, cpus: r.Spec.CPUs, pool: r.Spec.Pool}, m.overcommit)
	if err != nil {
		msg := fmt.Sprintf("host %s is dead; waiting for a host that can take this vm: %v", r.Host, err)
		state := r.State
		if wantRun {
			state = api.StateCrashed
		}
		_, serr := m.setState(ctx, &r, rev, state, msg)
		return serr
	}
	// The new epoch goes to the pool's owner file before the record moves:
	// from then on the old host can neither start nor keep the VM.
	spec := r.Spec
	spec.Epoch++
	actx, cancel := context.WithTimeout(ctx, hostCallTimeout)
	err = m.hostNamed(target).Attach(actx, spec)
	cancel()
	if err != nil {
		return fmt.Errorf("attach %s to %s: %w", name, target, err)
	}
	from := r.Host
	r.Spec, r.Host, r.Stranded = spec, target, false
	m.publish(api.Event{Type: "vm.relocated", VM: name, Host: target, Message: "from dead host " + from})
	restart := wantRun && withDefaults(r.Policy).Recovery == "restart"
	if !restart {
		msg := fmt.Sprintf("moved from dead host %s", from)
		if wantRun {
			msg += "; recovery is off: start it with 'vigil vm start " + name + "'"
			_, err := m.setState(ctx, &r, rev, api.StateCrashed, msg)
			return err
		}
		if r.State == api.StateRunning || r.State == api.StatePaused || r.State == api.StateStopping || r.State == api.StateStarting {
			r.State = api.StateStopped
		}
		_, err := m.setState(ctx, &r, rev, r.State, msg)
		return err
	}
	// A paused guest's memory died with its host: it comes back running.
	r.Desired = desiredRunning
	fence := time.Duration(death.FenceAfterMS) * time.Millisecond
	inc := api.Incident{ID: fmt.Sprintf("%019d", death.DeadAt.UnixNano()), VM: name, Kind: hostproto.IncidentHostFailure, Host: from,
		DetectedAt: *death.DeadAt, Action: "restart on " + target,
		Evidence: api.Evidence{LastHeartbeat: &death.LastHeartbeat,
			HeartbeatSilenceS: death.DeadAt.Sub(death.LastHeartbeat).Seconds(),
			Detail:            fmt.Sprintf("host %s stopped sending heartbeats", from)},
		Timeline: []api.TimelineEntry{
			{Time: death.LastHeartbeat, Event: "last heartbeat", Detail: "from host " + from},
			{Time: death.LastHeartbeat.Add(fence), Event: "fenced", Detail: fmt.Sprintf("host %s kills its vms after %s without a manager, if it still runs", from, fence)},
			{Time: *death.DeadAt, Event: "declared dead", Detail: fmt.Sprintf("after %s without a heartbeat", m.deadAfter)},
			{Time: time.Now().UTC(), Event: "moved", Detail: fmt.Sprintf("owner of the disk is now %s (epoch %d)", target, spec.Epoch)},
		}}
	if _, err := m.store.Create(ctx, incidentKey(name, inc.ID), incidentRecord{inc}); err != nil {
		m.log.Error("record incident", "vm", name, "err", err)
	}
	r.Failover = &failover{Incident: inc.ID, From: from}
	_, err = m.setState(ctx, &r, rev, api.StateRecovering, fmt.Sprintf("host %s is dead; restarting on %s", from, target))
	return err
}

// failover is a VM's move off a dead host, while it starts on the new one.
type failover struct {
	Incident string `json:"incident"`
	From     string `json:"from"`
	// Refused is the last reason the new host gave for not starting it
	// (e.g. the old copy still holds the disk).
	Refused string `json:"refused,omitempty"`
}

// finishFailover starts the VM on its new host. A refusal is kept and
// retried on the next pass: typically the disk is still locked by a copy
// on a host that is cut off but not yet fenced.
func (m *Manager) finishFailover(ctx context.Context, r *record, rev int64) error {
	name := r.Spec.Name
	if r.Desired != desiredRunning {
		r.Failover = nil
		_, err := m.save(ctx, r, rev)
		return err
	}
	h := m.hostNamed(r.Host)
	if h.Info().State != "up" {
		return nil // the new host is silent too; wait (or it dies and we move again)
	}
	if m.actual(*r).Running {
		return m.closeFailover(ctx, r, rev, "running on "+r.Host)
	}
	sctx, cancel := context.WithTimeout(ctx, hostCallTimeout)
	err := h.Start(sctx, name)
	cancel()
	if err != nil {
		if r.Failover.Refused != err.Error() {
			r.Failover.Refused = err.Error()
			m.appendTimeline(ctx, name, r.Failover.Incident, api.TimelineEntry{Time: time.Now().UTC(), Event: "start refused", Detail: err.Error()})
			_, serr := m.setState(ctx, r, rev, api.StateRecovering, fmt.Sprintf("restarting on %s after host %s died: %v", r.Host, r.Failover.From, err))
			return serr
		}
		return nil
	}
	r.OpenIncident = r.Failover.Incident
	return m.closeFailover(ctx, r, rev, "restarted on "+r.Host)
}

func (m *Manager) closeFailover(ctx context.Context, r *record, rev int64, what string) error {
	m.appendTimeline(ctx, r.Spec.Name, r.Failover.Incident, api.TimelineEntry{Time: time.Now().UTC(), Event: "restarted", Detail: what})
	from := r.Failover.From
	r.Failover = nil
	_, err := m.setState(ctx, r, rev, api.StateRunning, fmt.Sprintf("restarted on %s after host %s died", r.Host, from))
	return err
}

// onOldCopy records on the VM's latest host-failure incident what its old
// host did with its copy once it could act again (fenced it, dropped it):
// the real end of the old copy, next to the deadline the timeline assumed.
func (m *Manager) onOldCopy(e hostproto.Event) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
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
