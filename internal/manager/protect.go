package manager

import (
	"context"
	"fmt"
	"net/http"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/hostproto"
)

// Synchronized state: a protected VM runs on its host (the primary) and is
// checkpointed to a standby on another host of its storage pool (the
// secondary), which does not run it. The record keeps the pairing; the
// leader's protection pass makes the hosts match it (a standby on the
// secondary, a checkpoint loop on the primary), follows what the primary
// reports, and pairs a new secondary when one is lost. When the primary's
// host dies, the failover (failover.go) continues the VM on its secondary
// from the last committed checkpoint instead of rebooting it.

// protection is a VM's synchronized standby as its record keeps it.
type protection struct {
	IntervalMS int64 `json:"interval_ms"`
	// Pin is the secondary host the user asked for ("": any).
	Pin string `json:"pin,omitempty"`
	// Secondary is the host keeping the standby now ("": none yet).
	Secondary string `json:"secondary,omitempty"`
	// Generation numbers pairings: each new secondary gets the next one,
	// and hosts refuse streams of another.
	Generation int64     `json:"generation"`
	State      string    `json:"state"`
	Since      time.Time `json:"since"`
	Message    string    `json:"message,omitempty"`
	// Run is the primary's QEMU run whose checkpoints the secondary has
	// committed (a failover resumes only a checkpoint of that run).
	Run string `json:"run,omitempty"`
	// Lost: a standby existed before (a new one is a re-protection).
	Lost bool `json:"lost,omitempty"`
}

// Protection states.
const (
	protSyncing      = "syncing"
	protProtected    = "protected"
	protDegraded     = "degraded"
	protFailingOver  = "failing-over"
	protReprotecting = "re-protecting"
)

// protectCallTimeout bounds the pass's calls to the hosts of one VM.
const protectCallTimeout = 10 * time.Second

// DefaultCheckpointInterval is a protection's interval when none is given.
const DefaultCheckpointInterval = 500 * time.Millisecond

// Protect gives VM name a synchronized standby.
func (m *Manager) Protect(ctx context.Context, name string, req api.ProtectRequest) (api.VM, error) {
	if err := validName(name); err != nil {
		return api.VM{}, err
	}
	iv := time.Duration(req.IntervalMS) * time.Millisecond
	if req.IntervalMS == 0 {
		iv = DefaultCheckpointInterval
	}
	if iv < 50*time.Millisecond || iv > 10*time.Minute {
		return api.VM{}, errorf(ErrInvalid, "checkpoint interval %s is outside 50ms..10m", iv)
	}
	if req.SecondaryHost != "" {
		if err := validName(req.SecondaryHost); err != nil {
			return api.VM{}, err
		}
		if m.hostState(req.SecondaryHost) == "unknown" {
			return api.VM{}, errorf(ErrInvalid, "no host named %s: see 'vigil host list'", req.SecondaryHost)
		}
	}
	o, err := m.begin(ctx, name, opProtect, func(o *vmOp) error {
		r := o.r
		if r.Spec.Pool == "" {
			return errorf(ErrConflict, "vm %s has its disk on host %s's local storage: a standby on another host needs the disk in a storage pool (hosts started with --storage-pool)", name, r.Host)
		}
		if req.SecondaryHost == r.Host {
			return errorf(ErrInvalid, "vm %s runs on %s: its secondary must be another host", name, r.Host)
		}
		if m.remote(r.Host) == nil {
			return errorf(ErrConflict, "vm %s is on host %s, which is not a joined host: protection needs two joined hosts", name, r.Host)
		}
		return nil
	})
	if err != nil {
		return api.VM{}, err
	}
	ctx, cancel := detach(ctx)
	defer cancel()
	defer o.end(ctx)
	p := o.r.Protection
	if p == nil {
		p = &protection{State: protSyncing, Since: time.Now().UTC()}
	}
	// A new pin or interval re-pairs from scratch.
	if p.Pin != req.SecondaryHost || p.IntervalMS != iv.Milliseconds() {
		m.dropStandby(ctx, o.r.Spec.Name, p.Secondary)
		p.Secondary, p.Run = "", ""
	}
	p.Pin, p.IntervalMS = req.SecondaryHost, iv.Milliseconds()
	o.r.Protection = p
	o.publish(api.Event{Type: "vm.protection", VM: name, Host: o.r.Host, Message: fmt.Sprintf("protection on (every %s)", iv)})
	if err := o.release(ctx); err != nil {
		return api.VM{}, err
	}
	go m.reconcileProtection(context.WithoutCancel(ctx), name)
	return m.view(o.r), nil
}

// Unprotect ends VM name's protection: the primary stops checkpointing and
// the secondary forgets the standby.
func (m *Manager) Unprotect(ctx context.Context, name string) (api.VM, error) {
	if err := validName(name); err != nil {
		return api.VM{}, err
	}
	o, err := m.begin(ctx, name, opProtect, func(o *vmOp) error {
		if o.r.Protection == nil {
			return errorf(ErrConflict, "vm %s is not protected", name)
		}
		return nil
	})
	if err != nil {
		return api.VM{}, err
	}
	ctx, cancel := detach(ctx)
	defer cancel()
	defer o.end(ctx)
	// The host must stop checkpointing (and holding the guest's output):
	// a record without protection is never looked at by the pass again.
	if st := m.hostState(o.r.Host); st != "up" && st != "dead" {
		return api.VM{}, errorf(ErrUnavailable, "host %s of vm %s is %s: unprotect it once the host answers", o.r.Host, name, st)
	}
	if m.hostState(o.r.Host) == "up" {
		if _, err := hostproto.Unprotect.Call(ctx, m.hostNamed(o.r.Host), hostproto.VMRef{VM: name}); err != nil {
			return api.VM{}, fmt.Errorf("unprotect %s: %w", name, err)
		}
	}
	m.dropStandby(ctx, name, o.r.Protection.Secondary)
	o.r.Protection = nil
	o.publish(api.Event{Type: "vm.protection", VM: name, Host: o.r.Host, Message: "protection off"})
	if err := o.release(ctx); err != nil {
		return api.VM{}, err
	}
	return m.view(o.r), nil
}

// dropStandby tells a secondary to forget a standby (best effort: a host
// that is down forgets it when it comes back and gets no stream).
func (m *Manager) dropStandby(ctx context.Context, vm, secondary string) {
	if secondary == "" || m.hostState(secondary) != "up" {
		return
	}
	if _, err := hostproto.StandbyDrop.Call(ctx, m.hostNamed(secondary), hostproto.VMRef{VM: vm}); err != nil {
		m.log.Warn("drop a standby", "vm", vm, "host", secondary, "err", err)
	}
}

// protectionPass looks at every protected VM of rs (the records the
// failure watch has just read: one read of the store serves both) and
// acts where protectionNeeds says. Leader only.
func (m *Manager) protectionPass(ctx context.Context, rs []storedRecord) {
	for _, s := range rs {
		if s.rec.Protection == nil && s.rec.Op == nil && m.hostState(s.rec.Host) == "up" {
			if st := m.actual(s.rec); st.Protection != nil && m.protectionStart(s.rec.Spec.Name) {
				// The host checkpoints (and holds the output of) a VM that
				// is not protected: an unprotect it missed. Stop it.
				name, host := s.rec.Spec.Name, s.rec.Host
				go func() {
					defer m.protectionDone(name)
					cctx, cancel := context.WithTimeout(ctx, hostCallTimeout)
					defer cancel()
					// The pass reads the records' mirror, which may lag a
					// protect just made: the record itself decides.
					if r, _, err := m.load(cctx, name); err != nil || r.Protection != nil || r.Op != nil || r.Host != host {
						return
					}
					if _, err := hostproto.Unprotect.Call(cctx, m.hostNamed(host), hostproto.VMRef{VM: name}); err != nil {
						m.log.Warn("stop a protection the record does not have", "vm", name, "host", host, "err", err)
					}
				}()
			}
			continue
		}
		if s.rec.Protection == nil || s.rec.Op != nil {
			continue // a VM busy with another operation waits for the next pass
		}
		name := s.rec.Spec.Name
		// Calls to the hosts (pairing, telling them again) are spaced by
		// retellEvery: one that keeps failing must not write the record
		// every pass.
		need := m.protectionNeeds(s.rec)
		if need == "" || need != "state" && need != "run" && !m.mayTell(name) || !m.protectionStart(name) {
			continue
		}
		// In the background: host calls must not hold up the failure
		// watch that runs this pass.
		go func() {
			defer m.protectionDone(name)
			m.reconcileProtection(ctx, name)
		}()
	}
}

// protectionStart marks vm's protection as being worked on, unless it
// already is.
func (m *Manager) protectionStart(vm string) bool {
	m.protMu.Lock()
	defer m.protMu.Unlock()
	if m.protBusy[vm] {
		return false
	}
	if m.protBusy == nil {
		m.protBusy = map[string]bool{}
	}
	m.protBusy[vm] = true
	return true
}

func (m *Manager) protectionDone(vm string) {
	m.protMu.Lock()
	delete(m.protBusy, vm)
	m.protMu.Unlock()
}

// protectionNeeds says what a protection needs done now, from the record
// and what the hosts report ("" for nothing). It reads, never writes, so
// the pass costs nothing while all is well.
func (m *Manager) protectionNeeds(r record) string {
	p := r.Protection
	if p == nil || r.Failover != nil {
		return ""
	}
	if m.hostState(r.Host) != "up" {
		return "" // a dead primary is the failover's
	}
	st := m.actual(r)
	want, msg := p.State, p.Message
	switch {
	case !st.Running && p.Run != "":
		return "state" // its checkpoints are of a run that ended: forget them
	case !st.Running:
		want, msg = protDegraded, "the vm does not run: it is checkpointed again once it runs"
	case (p.Secondary == "" || m.hostState(p.Secondary) == "dead" || m.hostState(p.Secondary) == "unknown") && !m.anotherHostUp(r.Host):
		want, msg = protDegraded, "no other host is up to keep a standby"
	case p.Secondary == "" || m.hostState(p.Secondary) == "dead" || m.hostState(p.Secondary) == "unknown":
		return "pair"
	case st.Protection == nil || st.Protection.Generation != p.Generation || st.Protection.Secondary != p.Secondary:
		return "tell"
	case m.hostState(p.Secondary) != "up":
		want, msg = protDegraded, "secondary host "+p.Secondary+" is silent"
	case st.Protection.State == "protected" && st.Protection.Run == p.Run:
		want, msg = protProtected, ""
	case st.Protection.State == "protected":
		return "run" // a new run's first commit
	case st.Protection.State == "broken":
		want, msg = protDegraded, "checkpoint stream to "+p.Secondary+": "+st.Protection.Error
		if time.Since(p.Since) > 5*time.Second {
			// The secondary's agent may have restarted (forgetting the
			// standby, or at a new address): tell both again (both calls
			// are idempotent), at most every retellEvery (see the pass).
			return "retell"
		}
	default: // syncing
		want, msg = protSyncing, st.Protection.Error
		if p.Lost {
			want = protReprotecting
		}
	}
	if want != p.State || msg != p.Message {
		return "state"
	}
	return ""
}

// retellEvery spaces the pass's calls to one VM's hosts.
const retellEvery = 5 * time.Second

// mayTell says whether the hosts of vm's protection may be told again now
// (and notes that they are).
func (m *Manager) mayTell(vm string) bool {
	m.protMu.Lock()
	defer m.protMu.Unlock()
	if m.protTold == nil {
		m.protTold = map[string]time.Time{}
	}
	if time.Since(m.protTold[vm]) < retellEvery {
		return false
	}
	m.protTold[vm] = time.Now()
	return true
}

// anotherHostUp says whether a host other than primary is up (one that
// might keep a standby).
func (m *Manager) anotherHostUp(primary string) bool {
	for _, e := range m.hosts.entries() {
		if e.h.Name() != primary && e.deadAt.IsZero() && e.h.Info().State == "up" {
			return true
		}
	}
	return false
}

// reconcileProtection does what protectionNeeds asks, under the VM's lock.
func (m *Manager) reconcileProtection(ctx context.Context, name string) {
	o, err := m.begin(ctx, name, opProtect, nil)
	if err != nil {
		m.log.Debug("protection pass: vm busy", "vm", name, "err", err)
		return // busy with something else: the next pass comes back
	}
	// Short: the VM's lock is held meanwhile (a frozen host must not keep
	// users and the failover off the VM for long).
	ctx, cancel := context.WithTimeout(ctx, protectCallTimeout)
	defer cancel()
	defer o.end(ctx)
	r := &o.r
	p := r.Protection
	if p == nil {
		o.release(ctx)
		return
	}
	setState := func(state, msg string) {
		if state != p.State || msg != p.Message {
			if state != p.State {
				p.Since = time.Now().UTC()
			}
			p.State, p.Message = state, msg
			ev := state
			if msg != "" {
				ev += ": " + msg
			}
			o.publish(api.Event{Type: "vm.protection", VM: name, Host: r.Host, Message: ev})
		}
	}
	switch need := m.protectionNeeds(*r); need {
	case "pair":
		if p.Secondary != "" {
			p.Lost = true
		}
		m.dropStandby(ctx, name, p.Secondary)
		pin := p.Pin
		if pin == r.Host || m.hostState(pin) != "up" {
			pin = "" // the pinned host runs the VM now (a failover), or is gone
		}
		target, err := m.placeElsewhere(ctx, *r, pin)
		m.arrived(name)
		if err != nil {
			p.Secondary = ""
			setState(protDegraded, "no host can keep a standby: "+err.Error())
			break
		}
		p.Secondary, p.Generation, p.Run = target, p.Generation+1, ""
		if err := m.tellProtection(ctx, *r); err != nil {
			setState(protDegraded, err.Error())
			break
		}
		if p.Lost {
			setState(protReprotecting, "new secondary "+target)
		} else {
			setState(protSyncing, "secondary "+target)
		}
	case "tell", "retell":
		if err := m.tellProtection(ctx, *r); err != nil {
			setState(protDegraded, err.Error())
		}
	case "run":
		p.Run = m.actual(*r).Protection.Run
		setState(protProtected, "")
	case "state":
		st := m.actual(*r)
		switch {
		case !st.Running:
			p.Run = ""
			setState(protDegraded, "the vm does not run: it is checkpointed again once it runs")
		case p.Secondary == "" || m.hostState(p.Secondary) == "dead" || m.hostState(p.Secondary) == "unknown":
			setState(protDegraded, "no other host is up to keep a standby")
		case m.hostState(p.Secondary) != "up":
			setState(protDegraded, "secondary host "+p.Secondary+" is silent")
		case st.Protection == nil:
		case st.Protection.State == "protected":
			setState(protProtected, "")
		case st.Protection.State == "broken":
			setState(protDegraded, "checkpoint stream to "+p.Secondary+": "+st.Protection.Error)
		case p.Lost:
			setState(protReprotecting, st.Protection.Error)
		default:
			setState(protSyncing, st.Protection.Error)
		}
	}
	o.release(ctx)
}

// tellProtection makes the two hosts match the record: the standby on the
// secondary first, so the primary's stream is taken when it comes.
func (m *Manager) tellProtection(ctx context.Context, r record) error {
	p := r.Protection
	sec := m.remote(p.Secondary)
	if sec == nil {
		return fmt.Errorf("host %s has no registered address", p.Secondary)
	}
	if _, err := hostproto.Standby.Call(ctx, m.hostNamed(p.Secondary), hostproto.StandbyRequest{VM: r.Spec.Name, Primary: r.Host, Generation: p.Generation, MemoryBytes: r.Spec.MemoryBytes}); err != nil {
		return fmt.Errorf("standby on %s: %w", p.Secondary, err)
	}
	req := hostproto.ProtectRequest{VM: r.Spec.Name, Secondary: p.Secondary, Addr: sec.Addr(), IntervalMS: p.IntervalMS, Generation: p.Generation}
	if _, err := hostproto.Protect.Call(ctx, m.hostNamed(r.Host), req); err != nil {
		return fmt.Errorf("checkpoints from %s: %w", r.Host, err)
	}
	return nil
}

// protectionView is the API's view of a protection.
func (m *Manager) protectionView(r record, st hostproto.VMStatus) *api.Protection {
	p := r.Protection
	if p == nil {
		return nil
	}
	v := &api.Protection{State: p.State, Since: p.Since, Message: p.Message, SecondaryHost: p.Secondary, IntervalMS: p.IntervalMS}
	if hs := st.Protection; hs != nil && hs.Generation == p.Generation {
		if !hs.CommittedAt.IsZero() {
			at := hs.CommittedAt
			v.LastCheckpoint = &at
			if p.State == protProtected {
				v.RPOMS = float64(time.Since(at).Microseconds()) / 1000
			}
		}
		v.Checkpoints, v.PauseP50MS, v.PauseP99MS = hs.Checkpoints, hs.PauseP50MS, hs.PauseP99MS
		v.BytesPerCheckpoint, v.CheckpointMS = hs.Bytes, hs.TookMS
		if !hs.SecondaryHeardAt.IsZero() {
			at := hs.SecondaryHeardAt
			v.SecondaryHeardAt = &at
		}
	}
	return v
}

// activateStandby continues a failed-over VM on its secondary from the
// last committed checkpoint. It reports what happened for the incident's
// timeline; on an error the caller restarts the VM instead.
func (m *Manager) activateStandby(ctx context.Context, r *record) (api.TimelineEntry, error) {
	p := r.Protection
	res, err := hostproto.Activate.Call(ctx, m.hostNamed(r.Host), hostproto.ActivateRequest{VM: r.Spec.Name, Run: p.Run})
	now := time.Now().UTC()
	if err != nil {
		return api.TimelineEntry{Time: now, Event: "standby not usable", Detail: err.Error() + "; restarting the vm instead"}, err
	}
	// The standby is the VM now: a new one is needed.
	p.Secondary, p.Run, p.Lost = "", "", true
	p.State, p.Since, p.Message = protReprotecting, now, "continued on "+r.Host+"; looking for a new secondary"
	return api.TimelineEntry{Time: now, Event: "continued from checkpoint",
		Detail: fmt.Sprintf("on %s from checkpoint %d taken at %s (%d bytes; activation took %.0f ms): same boot, no restart",
			r.Host, res.Seq, res.TakenAt.Format(time.RFC3339Nano), res.Bytes, res.TookMS)}, nil
}

func (m *Manager) handleProtect(w http.ResponseWriter, r *http.Request) {
	var req api.ProtectRequest
	if err := decodeBody(r, &req); err != nil {
		writeError(w, m.log, err)
		return
	}
	vm, err := m.Protect(r.Context(), r.PathValue("name"), req)
	if err != nil {
		writeError(w, m.log, err)
		return
	}
	writeJSON(w, http.StatusOK, vm)
}

func (m *Manager) handleUnprotect(w http.ResponseWriter, r *http.Request) {
	vm, err := m.Unprotect(r.Context(), r.PathValue("name"))
	if err != nil {
		writeError(w, m.log, err)
		return
	}
	writeJSON(w, http.StatusOK, vm)
}
