package manager

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/hostproto"
)

func operation(action string, res hostproto.SaveResult) *api.Operation {
	return &api.Operation{Action: action, DurationMS: ms(res.Duration), PausedMS: ms(res.Paused), Bytes: res.Bytes}
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// pause stops the guest in memory, or saves it to a state file (to disk).
func (m *Manager) pause(ctx context.Context, r *record, rev int64, act hostproto.VMStatus, toDisk bool) error {
	name := r.Spec.Name
	if !act.Running {
		if r.State == api.StateSuspended {
			return errorf(ErrConflict, "vm %s is already suspended to disk", name)
		}
		return errorf(ErrConflict, "vm %s is not running (it is %s): only a running or paused vm can be paused", name, r.State)
	}
	if !toDisk {
		if act.RunState == "paused" {
			return errorf(ErrConflict, "vm %s is already paused", name)
		}
		t0 := time.Now()
		if err := m.hostNamed(r.Host).Pause(ctx, name); err != nil {
			return fmt.Errorf("pause vm %s: %w", name, err)
		}
		r.Desired = desiredPaused
		r.LastOperation = &api.Operation{Action: "pause", DurationMS: ms(time.Since(t0))}
		_, err := m.setState(ctx, r, rev, api.StatePaused, "")
		return err
	}
	res, err := m.hostNamed(r.Host).Suspend(ctx, name)
	if err != nil {
		// The host left the guest as it was; say so rather than guess.
		return fmt.Errorf("suspend vm %s (it keeps running as it was): %w", name, err)
	}
	r.Desired = desiredSuspended
	r.LastOperation = operation("suspend", res)
	_, err = m.setState(ctx, r, rev, api.StateSuspended, fmt.Sprintf("state saved to %s (%d MiB)", res.Path, res.Bytes>>20))
	return err
}

// resume continues a paused VM, or restores a suspended one from its state
// file (or, with discard, throws the state away and cold-boots).
func (m *Manager) resume(ctx context.Context, r *record, rev int64, act hostproto.VMStatus, discard bool) error {
	name := r.Spec.Name
	switch {
	case act.Running && act.RunState == "paused":
		if discard {
			return errorf(ErrInvalid, "vm %s is paused in memory: it has no saved state to discard", name)
		}
		t0 := time.Now()
		if err := m.hostNamed(r.Host).Resume(ctx, name); err != nil {
			return fmt.Errorf("resume vm %s: %w", name, err)
		}
		r.Desired = desiredRunning
		r.LastOperation = &api.Operation{Action: "resume", DurationMS: ms(time.Since(t0))}
		_, err := m.setState(ctx, r, rev, api.StateRunning, "")
		return err
	case act.Running:
		return errorf(ErrConflict, "vm %s is already running", name)
	case !act.SavedState:
		return errorf(ErrConflict, "vm %s is %s and has no saved state: start it with 'vigil vm start %s'", name, r.State, name)
	}
	if discard {
		if err := m.hostNamed(r.Host).DiscardState(name); err != nil {
			return err
		}
		m.publish(api.Event{Type: "vm.state-discarded", VM: name, Host: r.Host})
		return m.start(ctx, r, rev)
	}
	t0 := time.Now()
	if err := m.hostNamed(r.Host).Resume(ctx, name); err != nil {
		if errors.Is(err, hostproto.ErrBadState) {
			return &kindError{kind: ErrConflict, err: err, full: true, msg: fmt.Sprintf(
				"cannot resume vm %s: %v. It stays suspended with its state file untouched: keep it for later, or run 'vigil vm resume %s --discard-state' to cold-boot from the disk",
				name, err, name)}
		}
		return fmt.Errorf("resume vm %s (it stays suspended): %w", name, err)
	}
	r.Desired = desiredRunning
	r.LastOperation = &api.Operation{Action: "resume-from-disk", DurationMS: ms(time.Since(t0))}
	_, err := m.setState(ctx, r, rev, api.StateRunning, "")
	return err
}
