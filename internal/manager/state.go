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
	return &api.Operation{Action: action, DurationMS: ms(res.Duration), PausedMS: ms(res.Paused), FrozenMS: ms(res.Frozen),
		Bytes: res.Bytes, Note: res.Note}
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// pause stops the guest in memory, or saves it to a state file (to disk).
// checkAction has vetted the request.
func (m *Manager) pause(ctx context.Context, o *vmOp, act hostproto.VMStatus, toDisk bool) error {
	name := o.r.Spec.Name
	h := m.hostNamed(o.r.Host)
	if !toDisk {
		return o.finishQuick(ctx, "pause", desiredPaused, api.StatePaused, func(ctx context.Context) error {
			if _, err := hostproto.Pause.Call(ctx, h, hostproto.VMRef{VM: name}); err != nil {
				return fmt.Errorf("pause vm %s: %w", name, err)
			}
			return nil
		})
	}
	res, err := hostproto.Suspend.Call(ctx, h, hostproto.VMRef{VM: name})
	if err != nil {
		// The host left the guest as it was; say so rather than guess.
		return fmt.Errorf("suspend vm %s (it keeps running as it was): %w", name, err)
	}
	m.stepHook(opSuspend + "/saved")
	o.r.Desired = desiredSuspended
	o.r.LastOperation = operation("suspend", res)
	m.metrics.observeOp(o.r.LastOperation)
	return o.finish(ctx, api.StateSuspended, fmt.Sprintf("state saved to %s (%d MiB)", res.Path, res.Bytes>>20))
}

// resume continues a paused VM, or restores a suspended one from its state
// file (or, with discard, throws the state away and cold-boots).
func (m *Manager) resume(ctx context.Context, o *vmOp, act hostproto.VMStatus, discard bool) error {
	name := o.r.Spec.Name
	h := m.hostNamed(o.r.Host)
	if act.Running {
		return o.finishQuick(ctx, "resume", desiredRunning, api.StateRunning, func(ctx context.Context) error {
			if _, err := hostproto.Resume.Call(ctx, h, hostproto.VMRef{VM: name}); err != nil {
				return fmt.Errorf("resume vm %s: %w", name, err)
			}
			return nil
		})
	}
	if discard {
		if _, err := hostproto.DiscardState.Call(ctx, h, hostproto.VMRef{VM: name}); err != nil {
			return err
		}
		o.publish(api.Event{Type: "vm.state-discarded", VM: name, Host: o.r.Host})
		return m.start(ctx, o)
	}
	t0 := time.Now()
	if _, err := hostproto.Resume.Call(ctx, h, hostproto.VMRef{VM: name}); err != nil {
		if errors.Is(err, hostproto.ErrBadState) {
			return &kindError{kind: ErrConflict, err: err, full: true, msg: fmt.Sprintf(
				"cannot resume vm %s: %v. It stays suspended with its state file untouched: keep it for later, or run 'vigil vm resume %s --discard-state' to cold-boot from the disk",
				name, err, name)}
		}
		return fmt.Errorf("resume vm %s (it stays suspended): %w", name, err)
	}
	o.r.Desired = desiredRunning
	o.r.LastOperation = &api.Operation{Action: "resume-from-disk", DurationMS: ms(time.Since(t0))}
	m.metrics.observeOp(o.r.LastOperation)
	return o.finish(ctx, api.StateRunning, "")
}
