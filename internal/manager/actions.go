package manager

import (
	"context"
	"fmt"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/hostproto"
)

// ChangeState runs a start, stop, restart, pause or resume.
func (m *Manager) ChangeState(ctx context.Context, name string, req api.VMStateRequest) (api.VM, error) {
	if err := validName(name); err != nil {
		return api.VM{}, err
	}
	timeout := DefaultStopTimeout
	if req.TimeoutSeconds < 0 {
		return api.VM{}, errorf(ErrInvalid, "timeout %ds is negative", req.TimeoutSeconds)
	}
	if req.TimeoutSeconds > 0 {
		timeout = time.Duration(req.TimeoutSeconds) * time.Second
	}
	var kind string
	switch req.Action {
	case api.ActionStart:
		kind = opStart
	case api.ActionStop:
		kind = opStop
	case api.ActionRestart:
		kind = opRestart
	case api.ActionPause:
		kind = opPause
		if req.ToDisk {
			kind = opSuspend
		}
	case api.ActionResume:
		kind = opResume
	default:
		return api.VM{}, errorf(ErrInvalid, "unknown action %q: use start, stop, restart, pause or resume", req.Action)
	}
	if req.ToDisk && req.Action != api.ActionPause {
		return api.VM{}, errorf(ErrInvalid, "to_disk goes with the pause action")
	}
	if req.DiscardState && req.Action != api.ActionResume {
		return api.VM{}, errorf(ErrInvalid, "discard_state goes with the resume action")
	}
	var act hostproto.VMStatus
	o, err := m.begin(ctx, name, kind, func(o *vmOp) error {
		act = m.actual(o.r)
		if err := checkAction(o.r, act, req); err != nil {
			return err
		}
		// In memory, a pause or a resume leaves what it did on the host's
		// status for the reconciler to see: it can do without an intent.
		o.quick = act.Running && ((req.Action == api.ActionPause && !req.ToDisk) || req.Action == api.ActionResume)
		return nil
	})
	if err != nil {
		return api.VM{}, err
	}
	ctx, cancel := detach(ctx)
	defer cancel()
	defer o.end(ctx)
	// A paused guest cannot act on an ACPI power-down: stopping it is a kill.
	force := req.Force || act.RunState == "paused"
	switch req.Action {
	case api.ActionStart:
		err = m.start(ctx, o)
	case api.ActionStop:
		err = m.stop(ctx, o, force, timeout, true)
	case api.ActionRestart:
		if act.Running {
			err = m.stop(ctx, o, force, timeout, false)
		}
		if err == nil {
			err = m.start(ctx, o)
		}
	case api.ActionPause:
		err = m.pause(ctx, o, act, req.ToDisk)
	case api.ActionResume:
		err = m.resume(ctx, o, act, req.DiscardState)
	}
	return m.view(o.r), err
}

// checkAction refuses an action that makes no sense in the VM's state,
// before anything is locked or written.
func checkAction(r record, act hostproto.VMStatus, req api.VMStateRequest) error {
	name := r.Spec.Name
	running := act.Running
	if r.State == api.StateSuspended && act.SavedState && !running {
		switch req.Action {
		case api.ActionStart, api.ActionRestart:
			return errorf(ErrConflict, "vm %s is suspended: continue it with 'vigil vm resume %s', or cold-boot it with 'vigil vm resume %s --discard-state'", name, name, name)
		case api.ActionStop:
			return errorf(ErrConflict, "vm %s is suspended, not running: to throw its saved state away and keep it off, run 'vigil vm resume %s --discard-state' then 'vigil vm stop %s'", name, name, name)
		}
	}
	switch req.Action {
	case api.ActionStart:
		if running {
			return errorf(ErrConflict, "vm %s is already running", name)
		}
	case api.ActionStop:
		if !running {
			return errorf(ErrConflict, "vm %s is already stopped", name)
		}
	case api.ActionPause:
		if !running {
			if r.State == api.StateSuspended {
				return errorf(ErrConflict, "vm %s is already suspended to disk", name)
			}
			return errorf(ErrConflict, "vm %s is not running (it is %s): only a running or paused vm can be paused", name, r.State)
		}
		if !req.ToDisk && act.RunState == "paused" {
			return errorf(ErrConflict, "vm %s is already paused", name)
		}
	case api.ActionResume:
		switch {
		case running && act.RunState == "paused":
			if req.DiscardState {
				return errorf(ErrInvalid, "vm %s is paused in memory: it has no saved state to discard", name)
			}
		case running:
			return errorf(ErrConflict, "vm %s is already running", name)
		case !act.SavedState:
			return errorf(ErrConflict, "vm %s is %s and has no saved state: start it with 'vigil vm start %s'", name, r.State, name)
		}
	}
	// The host must not act on a change the record could not take.
	next := map[api.Action]api.VMState{api.ActionStart: api.StateStarting, api.ActionStop: api.StateStopping,
		api.ActionRestart: api.StateStarting, api.ActionPause: api.StatePaused, api.ActionResume: api.StateRunning}[req.Action]
	switch {
	case req.Action == api.ActionRestart && running, req.Action == api.ActionStop:
		next = api.StateStopping
	case req.ToDisk:
		next = api.StateSuspended
	case req.DiscardState:
		next = api.StateStarting
	}
	if err := checkTransition(r.State, next); err != nil {
		return errorf(ErrConflict, "vm %s is %s: %s it when it is settled (see 'vigil vm show %s')", name, r.State, req.Action, name)
	}
	return nil
}

// start boots the VM on its host and ends the operation: running, or
// stopped with the reason.
func (m *Manager) start(ctx context.Context, o *vmOp) error {
	o.r.Desired = desiredRunning
	if err := o.transition(ctx, api.StateStarting, ""); err != nil {
		return err
	}
	if _, err := hostproto.Start.Call(ctx, m.hostNamed(o.r.Host), hostproto.VMRef{VM: o.r.Spec.Name}); err != nil {
		o.r.Desired = desiredStopped
		o.finish(context.WithoutCancel(ctx), api.StateStopped, "start failed: "+err.Error())
		return fmt.Errorf("start vm %s: %w", o.r.Spec.Name, err)
	}
	return o.finish(ctx, api.StateRunning, "")
}

// stop powers the VM down; with last it ends the operation.
func (m *Manager) stop(ctx context.Context, o *vmOp, force bool, timeout time.Duration, last bool) error {
	o.r.Desired = desiredStopped
	if err := o.transition(ctx, api.StateStopping, ""); err != nil {
		return err
	}
	// The host's graceful stop waits up to timeout: give the call that
	// long and a little more.
	sctx, cancel := context.WithTimeout(ctx, timeout+hostproto.Stop.Timeout)
	defer cancel()
	if _, err := hostproto.Stop.Call(sctx, m.hostNamed(o.r.Host), hostproto.StopRequest{VM: o.r.Spec.Name, Force: force, TimeoutMS: timeout.Milliseconds()}); err != nil {
		// Still running as far as we know: say so, the reconciler retries.
		o.finish(context.WithoutCancel(ctx), api.StateStopping, "stop failed: "+err.Error())
		return fmt.Errorf("stop vm %s: %w", o.r.Spec.Name, err)
	}
	if last {
		return o.finish(ctx, api.StateStopped, "")
	}
	return o.transition(ctx, api.StateStopped, "")
}

// Delete stops the VM at once and removes it with its disk, files and
// snapshots. A VM with snapshots needs force: they go with it.
func (m *Manager) Delete(ctx context.Context, name string, force bool) error {
	if err := validName(name); err != nil {
		return err
	}
	if _, _, err := m.load(ctx, name); err != nil {
		return err
	}
	if !force {
		ss, err := m.snapshots(ctx, name)
		if err != nil {
			return err
		}
		if len(ss) > 0 {
			return errorf(ErrConflict, "vm %s has %d snapshot(s) that would be deleted with it: add --force to delete them too", name, len(ss))
		}
	}
	o, err := m.begin(ctx, name, opDelete, nil)
	if err != nil {
		return err
	}
	ctx, cancel := detach(ctx)
	defer cancel()
	defer o.end(ctx)
	return m.delete(ctx, o)
}

// delete removes the VM: files first, then the record. If it fails in
// between, the record still says deleting and the reconciler finishes.
func (m *Manager) delete(ctx context.Context, o *vmOp) error {
	o.r.Desired = desiredStopped
	if err := o.transition(ctx, api.StateDeleting, ""); err != nil {
		return err
	}
	if p := o.r.Protection; p != nil {
		if _, err := hostproto.Unprotect.Call(ctx, m.hostNamed(o.r.Host), hostproto.VMRef{VM: o.r.Spec.Name}); err != nil {
			m.log.Warn("unprotect a vm being deleted", "vm", o.r.Spec.Name, "err", err)
		}
		m.dropStandby(ctx, o.r.Spec.Name, p.Secondary)
	}
	if _, err := hostproto.Delete.Call(ctx, m.hostNamed(o.r.Host), hostproto.VMRef{VM: o.r.Spec.Name}); err != nil {
		return fmt.Errorf("delete vm %s: %w", o.r.Spec.Name, err)
	}
	return o.deleteRecord(ctx)
}
