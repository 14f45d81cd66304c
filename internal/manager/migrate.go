package manager

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/hostproto"
)

// Migrate moves a VM to another host of its storage pool: a running VM
// live (QEMU migration over TCP between the two host agents; the guest
// keeps running and keeps its boot), a stopped or suspended one by handing
// its files over. to names the host; empty lets the scheduler choose.
func (m *Manager) Migrate(ctx context.Context, name, to string) (api.VM, error) {
	if err := validName(name); err != nil {
		return api.VM{}, err
	}
	_, r, err := m.migrate(ctx, name, to, false)
	if err != nil {
		return m.view(r), err
	}
	return m.view(r), nil
}

// migrate moves one VM and reports the move and the record as it ended.
// With wait it waits (up to a minute) for an operation in progress.
func (m *Manager) migrate(ctx context.Context, name, to string, wait bool) (api.DrainMove, record, error) {
	move := api.DrainMove{VM: name}
	var live bool
	var spec hostproto.VMSpec
	prepare := func(o *vmOp) error {
		r := o.r
		if r.Spec.Pool == "" {
			return errorf(ErrConflict, "vm %s has its disk on host %s's local storage: only vms in a storage pool (hosts started with --storage-pool) can move", name, r.Host)
		}
		if to == r.Host {
			return errorf(ErrInvalid, "vm %s is already on host %s", name, to)
		}
		if r.Protection != nil {
			return errorf(ErrConflict, "vm %s is protected: unprotect it to move it ('vigil vm unprotect %s'), then protect it again", name, name)
		}
		if st := m.hostState(r.Host); st != "up" {
			return errorf(ErrUnavailable, "host %s of vm %s is %s: a vm moves only from a host that answers", r.Host, name, st)
		}
		act := m.actual(r)
		live = act.Running
		switch {
		case live && (r.State != api.StateRunning || act.RunState != "running"):
			return errorf(ErrConflict, "vm %s is %s: live migration moves running vms; resume it first, or suspend it to disk and move it then", name, r.State)
		case !live && r.State != api.StateStopped && r.State != api.StateSuspended && r.State != api.StateCrashed && r.State != api.StateFailed:
			return errorf(ErrConflict, "vm %s is %s: wait until it is running or stopped", name, r.State)
		}
		if to != "" && m.hostState(to) == "unknown" {
			return errorf(ErrInvalid, "no host named %s: see 'vigil host list'", to)
		}
		target, err := m.placeElsewhere(ctx, r, to)
		if err != nil {
			return err
		}
		move.To, move.Live = target, live
		spec = r.Spec
		spec.Epoch++
		o.intent.Target, o.intent.Epoch = target, spec.Epoch
		o.intent.Kind = opMove
		if live {
			o.intent.Kind = opMigrate
			// Migrating tells every manager's reconciler and event
			// handlers to keep off this VM until the move is recorded.
			return o.set(api.StateMigrating, "to "+target)
		}
		return nil
	}
	kind := opMove
	var o *vmOp
	var err error
	if wait {
		o, err = m.beginWait(ctx, name, opMigrate, prepare)
	} else {
		o, err = m.begin(ctx, name, opMigrate, prepare)
	}
	defer m.arrived(name)
	if err != nil {
		r, _, _ := m.load(context.WithoutCancel(ctx), name)
		return move, r, err
	}
	if live {
		kind = opMigrate
	}
	// Once started, a move runs to its end even if the caller goes away:
	// a half-done move is what loses VMs.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), migrateTimeout)
	defer cancel()
	defer o.end(ctx)
	if !live {
		err = m.moveCold(ctx, o, spec, move.To)
		return move, o.r, err
	}
	move.DowntimeMS, err = m.moveLive(ctx, o, spec, move.To, kind)
	return move, o.r, err
}

// placeElsewhere picks a host of the VM's pool other than its own (to, if
// given), and holds room there until arrived.
func (m *Manager) placeElsewhere(ctx context.Context, r record, to string) (string, error) {
	m.placeMu.Lock()
	defer m.placeMu.Unlock()
	return m.placeLocked(ctx, r, to)
}

// placeLocked is placeElsewhere for a caller that holds placeMu.
func (m *Manager) placeLocked(ctx context.Context, r record, to string) (string, error) {
	// The cache (with this manager's reservations in moving): an
	// evacuation places every VM of a dead host one after another, and a
	// store read of every record each time made a host of 20 VMs take
	// seconds among 20,000 (docs/scale.md).
	res, err := m.placementReserved(ctx)
	if err != nil {
		return "", err
	}
	var cands []candidate
	for _, c := range m.hosts.candidatesFrom(res.usage, res.recordOf, m.moving) {
		if c.host.Name != r.Host {
			// The room a VM's standby holds is the VM's own.
			if p := r.Protection; p != nil && p.Secondary == c.host.Name {
				c.usedMemory -= r.Spec.MemoryBytes
			}
			cands = append(cands, c)
		}
	}
	target, err := place(cands, need{mem: r.Spec.MemoryBytes, cpus: r.Spec.CPUs, pin: to, pool: r.Spec.Pool}, m.overcommit)
	if err == nil {
		m.moving[r.Spec.Name] = reservation{host: target, mem: r.Spec.MemoryBytes, cpus: r.Spec.CPUs}
	}
	return target, err
}

// arrived ends the move of a VM (its record now says where it is, or it
// did not go). The room held for it stays until placement's mirror of the
// records shows it (see pruneMoving).
func (m *Manager) arrived(vm string) {
	m.placeMu.Lock()
	if res, ok := m.moving[vm]; ok {
		res.arrived = time.Now()
		m.moving[vm] = res
	}
	m.placeMu.Unlock()
}

// moveCold hands a VM that does not run to another host of its pool: the
// new host takes the lease, then the record follows.
func (m *Manager) moveCold(ctx context.Context, o *vmOp, spec hostproto.VMSpec, target string) error {
	name, from := o.r.Spec.Name, o.r.Host
	spec.NICs = m.nicsOn(spec.NICs, target)
	if _, err := hostproto.Attach.Call(ctx, m.hostNamed(target), spec); err != nil {
		return fmt.Errorf("move vm %s to %s: %w", name, target, err)
	}
	m.stepHook(opMove + "/attach")
	o.r.Spec, o.r.Host = spec, target
	o.publish(api.Event{Type: "vm.moved", VM: name, Host: target, Message: "from " + from})
	return o.release(ctx)
}

// moveLive migrates a running VM in named steps. Before the switchover a
// failure undoes what was done (the destination's QEMU goes) and the VM
// stays where it was, running; after it, the record follows the guest
// whatever else fails.
func (m *Manager) moveLive(ctx context.Context, o *vmOp, spec hostproto.VMSpec, target, kind string) (float64, error) {
	name, from := o.r.Spec.Name, o.r.Host
	src, dst := m.hostNamed(from), m.hostNamed(target)
	// The stream goes to the destination's registered address (never to
	// one a host or a caller names), over TLS between the two hosts.
	addr, err := m.hostIP(target)
	if err != nil {
		o.finish(ctx, api.StateRunning, fmt.Sprintf("live migration to %s failed; still on %s: %v", target, from, err))
		return 0, err
	}
	var port int
	var st hostproto.Migration
	err = o.run(ctx, kind, []step{
		{name: "prepare-destination",
			do: func(ctx context.Context) error {
				spec.NICs = m.nicsOn(spec.NICs, target)
				res, err := hostproto.MigrateIn.Call(ctx, dst, hostproto.MigrateInRequest{Spec: spec, Source: from})
				port = res.Port
				return err
			},
			undo: func(ctx context.Context) error {
				_, err := hostproto.MigrateAbort.Call(ctx, dst, hostproto.VMRef{VM: name})
				return err
			}},
		// The source reports success if the migration completed even while
		// being cancelled, so an error here means the guest is still on
		// the source; the destination refuses to abort a guest it runs.
		{name: "transfer",
			do: func(ctx context.Context) (err error) {
				st, err = hostproto.MigrateOut.Call(ctx, src, hostproto.MigrateOutRequest{VM: name, Dest: target, Addr: addr, Port: port})
				return err
			}},
	})
	if err != nil {
		if k := hostproto.KindOf(err); k == "unreachable" || k == "timeout" {
			// The answer was lost, not the migration: where the guest is
			// now is what the hosts say.
			in := *o.r.Op
			if serr := m.settleMove2(ctx, o, &in, "the transfer's answer was lost: "+err.Error()); serr != nil {
				o.keepIntent = true // the reconciler settles it
				return 0, wrapf(ErrUnavailable, err, "migrate vm %s to %s: its outcome is not known yet (%v)", name, target, serr)
			}
			return 0, o.release(ctx)
		}
		o.finish(ctx, api.StateRunning, fmt.Sprintf("live migration to %s failed; still on %s: %v", target, from, err))
		return 0, wrapf(ErrConflict, err, "migrate vm %s to %s", name, target)
	}
	// The guest runs on the destination now: whatever happens next, the
	// record must follow it. Finishing (the destination takes the lease and
	// the port) is retried; if it still fails, the intent stays and the
	// reconciler finishes it (migrate-finish is idempotent).
	var ferr error
	for attempt := 0; attempt < 3; attempt++ {
		fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), hostproto.MigrateFinish.Timeout)
		_, ferr = hostproto.MigrateFinish.Call(fctx, dst, hostproto.VMRef{VM: name})
		cancel()
		if ferr == nil || hostproto.KindOf(ferr) != "unreachable" && hostproto.KindOf(ferr) != "timeout" {
			break
		}
	}
	m.stepHook(kind + "/finish")
	msg := fmt.Sprintf("migrated live from %s in %.0f ms (downtime %.0f ms)", from, ms(st.Total), ms(st.Downtime))
	o.r.LastOperation = &api.Operation{Action: "migrate", DurationMS: ms(st.Total), PausedMS: ms(st.Downtime), Bytes: st.Bytes}
	m.metrics.observeOp(o.r.LastOperation)
	if ferr != nil && (hostproto.KindOf(ferr) == "unreachable" || hostproto.KindOf(ferr) == "timeout") {
		o.keepIntent = true
		o.save(ctx)
		return ms(st.Downtime), wrapf(ErrUnavailable, ferr, "vm %s moved to %s, but the destination did not confirm; the manager finishes it", name, target)
	}
	state := api.StateRunning
	if ferr != nil {
		msg += "; " + ferr.Error()
		if s, err := m.freshStatus(ctx, target, name); err != nil || !s.Running {
			state = api.StateCrashed // the reconciler recovers it under its policy
		}
	}
	o.r.Spec, o.r.Host = spec, target
	o.publish(api.Event{Type: "vm.migrated", VM: name, Host: target, Message: msg})
	if err := o.finish(ctx, state, msg); err != nil {
		return ms(st.Downtime), err
	}
	return ms(st.Downtime), ferr
}

// hostIP is the IP address a host registered to be reached at.
func (m *Manager) hostIP(name string) (string, error) {
	h := m.remote(name)
	if h == nil {
		return "", errorf(ErrConflict, "host %s is not a remote host with a registered address: live migration needs two joined hosts", name)
	}
	ip, _, err := net.SplitHostPort(h.Addr())
	if err != nil || net.ParseIP(ip) == nil {
		return "", errorf(ErrConflict, "host %s registered the address %q, which is not IP:PORT: live migration needs its IP address", name, h.Addr())
	}
	return ip, nil
}

// migrateTimeout bounds a whole move.
const migrateTimeout = 10 * time.Minute

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
	r, _, err := m.load(ctx, name)
	if err != nil || r.Host != host {
		return api.DrainMove{}, nil // deleted or moved meanwhile
	}
	move, _, err := m.migrate(ctx, name, "", true)
	return move, err
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
	if m.hostState(host) == "unknown" {
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
