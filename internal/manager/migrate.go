package manager

import (
	"context"
	"fmt"
	"net/http"
	"time"

	"github.com/vigil-project/vigil/api"
)

// Migrate moves a VM to another host of its storage pool: a running VM
// live (QEMU migration over TCP between the two host agents; the guest
// keeps running and keeps its boot), a stopped or suspended one by handing
// its files over. to names the host; empty lets the scheduler choose.
func (m *Manager) Migrate(ctx context.Context, name, to string) (api.VM, error) {
	if err := validName(name); err != nil {
		return api.VM{}, err
	}
	r, rev, unlock, err := m.lockLoad(ctx, name)
	if err != nil {
		return api.VM{}, err
	}
	defer unlock()
	_, err = m.migrateLocked(ctx, &r, rev, to)
	if fresh, _, lerr := m.load(context.WithoutCancel(ctx), name); lerr == nil {
		r = fresh
	}
	return m.view(r), err
}

// migrateLocked moves r (the caller holds its lock) and reports the move.
func (m *Manager) migrateLocked(ctx context.Context, r *record, rev int64, to string) (api.DrainMove, error) {
	name := r.Spec.Name
	move := api.DrainMove{VM: name}
	if r.Spec.Pool == "" {
		return move, errorf(ErrConflict, "vm %s has its disk on host %s's local storage: only vms in a storage pool (hosts started with --storage-pool) can move", name, r.Host)
	}
	if to == r.Host {
		return move, errorf(ErrInvalid, "vm %s is already on host %s", name, to)
	}
	if m.hostNamed(r.Host).Info().State != "up" {
		return move, errorf(ErrUnavailable, "host %s of vm %s is not up: a vm moves only from a host that answers", r.Host, name)
	}
	act := m.actual(*r)
	live := act.Running
	switch {
	case live && (r.State != api.StateRunning || act.RunState != "running"):
		return move, errorf(ErrConflict, "vm %s is %s: live migration moves running vms; resume it first, or suspend it to disk and move it then", name, r.State)
	case !live && r.State != api.StateStopped && r.State != api.StateSuspended && r.State != api.StateCrashed && r.State != api.StateFailed:
		return move, errorf(ErrConflict, "vm %s is %s: wait until it is running or stopped", name, r.State)
	}
	rs, err := m.records(ctx)
	if err != nil {
		return move, err
	}
	var cands []candidate
	for _, c := range m.hosts.candidates(rs) {
		if c.host.Name != r.Host {
			cands = append(cands, c)
		}
	}
	if to != "" && m.hostNamed(to).Info().State == "unknown" {
		return move, errorf(ErrInvalid, "no host named %s: see 'vigil host list'", to)
	}
	target, err := place(cands, need{mem: r.Spec.MemoryBytes, cpus: r.Spec.CPUs, pin: to, pool: r.Spec.Pool}, m.overcommit)
	if err != nil {
		return move, err
	}
	move.To = target
	spec := r.Spec
	spec.Epoch++
	from, src, dst := r.Host, m.hostNamed(r.Host), m.hostNamed(target)

	// Once started, a move runs to its end even if the caller goes away:
	// a half-done move is what loses VMs.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), migrateTimeout)
	defer cancel()
	if !live {
		// Cold: the files are in the pool; the new host takes the lease.
		if err := dst.Attach(ctx, spec); err != nil {
			return move, fmt.Errorf("move vm %s to %s: %w", name, target, err)
		}
		if err := m.commitMove(ctx, name, func(r *record) {
			r.Spec, r.Host = spec, target
		}); err != nil {
			return move, err
		}
		m.publish(api.Event{Type: "vm.moved", VM: name, Host: target, Message: "from " + from})
		return move, nil
	}

	move.Live = true
	// Migrating tells every manager's reconciler and event handlers to keep
	// off this VM until the move is recorded.
	rev, err = m.setState(ctx, r, rev, api.StateMigrating, "to "+target)
	if err != nil {
		return move, err
	}
	fail := func(err error) (api.DrainMove, error) {
		m.commitMove(ctx, name, func(r *record) {
			r.State, r.Message = api.StateRunning, fmt.Sprintf("live migration to %s failed; still on %s: %v", target, from, err)
		})
		return move, wrapf(ErrConflict, err, "migrate vm %s to %s", name, target)
	}
	uri, err := dst.MigrateIn(ctx, spec)
	if err != nil {
		return fail(err)
	}
	st, err := src.MigrateOut(ctx, name, uri)
	if err != nil {
		// The source reports success if the migration completed even
		// while being cancelled, so an error means the guest is still on
		// the source; the destination refuses to abort a guest it runs.
		if aerr := dst.MigrateAbort(ctx, name); aerr != nil {
			m.log.Error("abort incoming migration", "vm", name, "host", target, "err", aerr)
		}
		return fail(err)
	}
	// The guest runs on the destination now: whatever happens next, the
	// record must follow it.
	ferr := dst.MigrateFinish(ctx, name)
	msg := fmt.Sprintf("migrated live from %s in %.0f ms (downtime %.0f ms)", from, ms(st.Total), ms(st.Downtime))
	state := api.StateRunning
	if ferr != nil {
		msg += "; " + ferr.Error()
		if !m.hostStatusRunning(target, name) {
			state = api.StateCrashed // the reconciler recovers it under its policy
		}
	}
	move.DowntimeMS = ms(st.Downtime)
	if err := m.commitMove(ctx, name, func(r *record) {
		r.Spec, r.Host, r.State, r.Message = spec, target, state, msg
		r.LastOperation = &api.Operation{Action: "migrate", DurationMS: ms(st.Total), PausedMS: ms(st.Downtime), Bytes: st.Bytes}
	}); err != nil {
		return move, err
	}
	m.log.Info("vm state", "vm", name, "state", state, "message", msg)
	m.publish(api.Event{Type: "vm.state", VM: name, Host: target, State: state, Message: msg})
	m.publish(api.Event{Type: "vm.migrated", VM: name, Host: target, Message: msg})
	r.Spec, r.Host, r.State, r.Message = spec, target, state, msg
	return move, ferr
}

// migrateTimeout bounds a whole move.
const migrateTimeout = 10 * time.Minute

// hostStatusRunning tells whether host reports vm running.
func (m *Manager) hostStatusRunning(host, vm string) bool {
	st, err := m.hostNamed(host).Status(vm)
	return err == nil && st.Running
}

// commitMove applies change to the VM's latest record and saves it, retrying
// on a concurrent write: after a switchover the record must follow the
// guest whatever else happened to it meanwhile (another manager's
// reconciler may have touched it).
func (m *Manager) commitMove(ctx context.Context, name string, change func(*record)) error {
	var err error
	for attempt := 0; attempt < 20; attempt++ {
		r, rev, lerr := m.load(ctx, name)
		if lerr != nil {
			return lerr
		}
		change(&r)
		if _, err = m.save(ctx, &r, rev); err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(50 * time.Millisecond):
		}
	}
	return err
}

// Drain keeps new VMs off host and moves its VMs away: running ones live,
// stopped and suspended ones by handing over their files. VMs that cannot
// move (local disks, or no room elsewhere) stay, and the result says why.
func (m *Manager) Drain(ctx context.Context, host string) (api.DrainResult, error) {
	res := api.DrainResult{Host: host, Moved: []api.DrainMove{}, Stayed: []api.DrainStay{}}
	if err := m.setHostDrained(ctx, host, true); err != nil {
		return res, err
	}
	rs, err := m.records(ctx)
	if err != nil {
		return res, err
	}
	for _, s := range rs {
		if s.rec.Host != host {
			continue
		}
		name := s.rec.Spec.Name
		move, err := m.drainOne(ctx, name, host)
		if err != nil {
			res.Stayed = append(res.Stayed, api.DrainStay{VM: name, Reason: err.Error()})
			continue
		}
		if move.To != "" {
			res.Moved = append(res.Moved, move)
		}
	}
	m.publish(api.Event{Type: "host.drained", Host: host,
		Message: fmt.Sprintf("%d vm(s) moved, %d stayed", len(res.Moved), len(res.Stayed))})
	return res, nil
}

func (m *Manager) drainOne(ctx context.Context, name, host string) (api.DrainMove, error) {
	wctx, cancel := context.WithTimeout(ctx, time.Minute)
	unlock, err := m.waitLock(wctx, name)
	cancel()
	if err != nil {
		return api.DrainMove{}, errorf(ErrBusy, "vm %s stayed busy with another operation", name)
	}
	defer unlock()
	r, rev, err := m.load(ctx, name)
	if err != nil || r.Host != host {
		return api.DrainMove{}, nil // deleted or moved meanwhile
	}
	return m.migrateLocked(ctx, &r, rev, "")
}

// Enable lets the scheduler place VMs on a drained host again.
func (m *Manager) Enable(ctx context.Context, host string) error {
	if err := m.setHostDrained(ctx, host, false); err != nil {
		return err
	}
	m.publish(api.Event{Type: "host.enabled", Host: host})
	return nil
}

// setHostDrained records the flag in the store (so every manager, and this
// one after a restart, keeps it) and in the registry.
func (m *Manager) setHostDrained(ctx context.Context, host string, drained bool) error {
	if err := validName(host); err != nil {
		return err
	}
	if m.hostNamed(host).Info().State == "unknown" {
		return errorf(ErrNotFound, "no host named %s: see 'vigil host list'", host)
	}
	var rec hostRecord
	rev, err := m.store.Get(ctx, "hosts/"+host, &rec)
	if err == nil {
		rec.Drained = drained
		if _, err := m.store.Update(ctx, "hosts/"+host, rev, rec); err != nil {
			return wrapf(ErrUnavailable, err, "record host %s", host)
		}
	}
	// (The dev agent's in-process host has no record: the flag lives in
	// memory only.)
	m.setDrained(host, drained)
	return nil
}

func (m *Manager) handleMigrate(w http.ResponseWriter, r *http.Request) {
	var req api.MigrateRequest
	if err := decodeBody(r, &req); err != nil {
		writeError(w, m.log, err)
		return
	}
	vm, err := m.Migrate(r.Context(), r.PathValue("name"), req.To)
	if err != nil {
		writeError(w, m.log, err)
		return
	}
	writeJSON(w, http.StatusOK, vm)
}

func (m *Manager) handleDrain(w http.ResponseWriter, r *http.Request) {
	res, err := m.Drain(r.Context(), r.PathValue("name"))
	if err != nil {
		writeError(w, m.log, err)
		return
	}
	writeJSON(w, http.StatusOK, res)
}

func (m *Manager) handleEnable(w http.ResponseWriter, r *http.Request) {
	if err := m.Enable(r.Context(), r.PathValue("name")); err != nil {
		writeError(w, m.log, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}
