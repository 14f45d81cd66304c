package manager

import (
	"context"
	"errors"
	"fmt"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/hostproto"
	"github.com/vigil-project/vigil/internal/store"
)

// recoverOrphan finishes or rolls back an operation whose manager died in
// the middle of it (its lock went with the manager's lease; its intent is
// still in the record). It decides from what the hosts report now, not from
// how far the dead manager got: the hosts are the truth. The VM's lock is
// held; a level-based look follows (the caller re-queues the VM).
func (m *Manager) recoverOrphan(ctx context.Context, o *vmOp) error {
	in := o.orphan
	name := o.r.Spec.Name
	// A host finishes an operation even when the manager that asked is
	// gone: while it is at it, wait.
	if st, err := m.freshStatus(ctx, o.r.Host, name); err == nil && st.Busy != "" {
		return fmt.Errorf("host %s is still running the %s", o.r.Host, st.Busy)
	}
	m.log.Warn("settling an operation a stopped manager left", "vm", name, "op", in.Kind, "manager", in.Manager, "since", in.Started)
	o.publish(api.Event{Type: "vm.op-recovered", VM: name, Host: o.r.Host,
		Message: fmt.Sprintf("%s left by manager %s", in.Kind, in.Manager)})
	var err error
	switch in.Kind {
	case opMigrate:
		err = m.settleMigration(ctx, o, in)
	case opMove:
		err = m.settleMove(ctx, o, in)
	case opSuspend:
		err = m.settleSuspend(ctx, o)
	case opSnapshot:
		err = m.settleSnapshot(ctx, o, in)
	case opSnapDel:
		err = m.settleSnapshotDelete(ctx, o, in)
	}
	if err != nil {
		return fmt.Errorf("settle the %s left on vm %s: %w", in.Kind, name, err)
	}
	// Anything else (a start, a stop, a pause, a delete, a revert) is made
	// whole by the level-based reconcile that follows.
	return o.release(ctx)
}

// freshStatus asks the host directly: after a crash, a cached status may
// predate what happened.
func (m *Manager) freshStatus(ctx context.Context, host, vm string) (hostproto.VMStatus, error) {
	return hostproto.Status.Call(ctx, m.hostNamed(host), hostproto.VMRef{VM: vm})
}

// settleMigration: if the guest runs on the destination, the move
// completed (or completes now): finish it there and record it. If it still
// runs on the source, the move is abandoned: the destination's waiting QEMU
// goes. If it runs nowhere, the destination's QEMU goes and the VM is
// recorded as crashed, for crash recovery to restart it where its record is.
func (m *Manager) settleMigration(ctx context.Context, o *vmOp, in *opIntent) error {
	return m.settleMove2(ctx, o, in, "its manager stopped")
}

// settleMove2 decides where a live migration's guest ended up and records
// it (see settleMigration); why says what cut the migration short.
func (m *Manager) settleMove2(ctx context.Context, o *vmOp, in *opIntent, why string) error {
	name, from := o.r.Spec.Name, o.r.Host
	dst := m.hostNamed(in.Target)
	// The source first: once it has quit, the destination's answer is
	// final (it runs the guest, or the guest is lost), never in flight.
	srcSt, srcErr := m.freshStatus(ctx, from, name)
	dstSt, dstErr := m.freshStatus(ctx, in.Target, name)
	if dstErr != nil && !errors.Is(dstErr, hostproto.ErrUnknownVM) || srcErr != nil && !errors.Is(srcErr, hostproto.ErrUnknownVM) {
		return fmt.Errorf("cannot tell where the guest runs: source %v, destination %v", srcErr, dstErr)
	}
	if srcSt.Busy != "" || dstSt.Busy != "" {
		return fmt.Errorf("a host is still at it (source: %q, destination: %q)", srcSt.Busy, dstSt.Busy)
	}
	switch {
	case dstErr == nil && dstSt.Running && dstSt.RunState != "inmigrate" && !srcSt.Running:
		if _, err := hostproto.MigrateFinish.Call(ctx, dst, hostproto.VMRef{VM: name}); err != nil {
			return fmt.Errorf("finish the migration on %s: %w", in.Target, err)
		}
		o.r.Spec.Epoch, o.r.Host = in.Epoch, in.Target
		o.publish(api.Event{Type: "vm.migrated", VM: name, Host: in.Target, Message: "from " + from + " (completed after " + why + ")"})
		return o.set(api.StateRunning, fmt.Sprintf("migrated live from %s; completed after %s", from, why))
	case srcSt.Running && srcSt.RunState != "postmigrate":
		if dstErr == nil {
			if _, err := hostproto.MigrateAbort.Call(ctx, dst, hostproto.VMRef{VM: name}); err != nil {
				return fmt.Errorf("abort the incoming copy on %s: %w", in.Target, err)
			}
		}
		return o.set(api.StateRunning, fmt.Sprintf("live migration to %s was abandoned (%s); still on %s", in.Target, why, from))
	case dstErr == nil && dstSt.Running && dstSt.RunState == "inmigrate" && srcSt.Running:
		return fmt.Errorf("the migration to %s is still in flight", in.Target)
	default:
		if dstErr == nil {
			if _, err := hostproto.MigrateAbort.Call(ctx, dst, hostproto.VMRef{VM: name}); err != nil {
				return fmt.Errorf("abort the incoming copy on %s: %w", in.Target, err)
			}
		}
		return o.set(api.StateCrashed, fmt.Sprintf("live migration to %s was cut short (%s) and the guest runs on neither host", in.Target, why))
	}
}

// settleMove finishes a cold move: the destination may already hold the
// lease; taking it again with the same epoch is harmless.
func (m *Manager) settleMove(ctx context.Context, o *vmOp, in *opIntent) error {
	spec := o.r.Spec
	spec.Epoch = in.Epoch
	spec.NICs = m.nicsOn(spec.NICs, in.Target)
	if _, err := hostproto.Attach.Call(ctx, m.hostNamed(in.Target), spec); err != nil {
		return fmt.Errorf("attach to %s: %w", in.Target, err)
	}
	from := o.r.Host
	o.r.Spec, o.r.Host = spec, in.Target
	o.publish(api.Event{Type: "vm.moved", VM: spec.Name, Host: in.Target, Message: "from " + from + " (completed after its manager stopped)"})
	return nil
}

// settleSuspend: the host finishes a save it began even when its manager
// goes away. A saved state and no QEMU is a suspended VM; a QEMU still
// running means the save failed and the guest goes on.
func (m *Manager) settleSuspend(ctx context.Context, o *vmOp) error {
	st, err := m.freshStatus(ctx, o.r.Host, o.r.Spec.Name)
	if err != nil {
		return err
	}
	if st.Busy != "" {
		return fmt.Errorf("the host is still at it (%s)", st.Busy)
	}
	switch {
	case st.SavedState && !st.Running:
		o.r.Desired = desiredSuspended
		return o.set(api.StateSuspended, "state saved (the suspend finished after its manager stopped)")
	case st.Running && st.RunState == "paused":
		o.r.Desired = desiredPaused
		return o.set(api.StatePaused, "")
	case st.Running:
		o.r.Desired = desiredRunning
		return o.set(api.StateRunning, "the suspend was cut short when its manager stopped; the guest runs on")
	}
	return nil // neither: the reconciler sees a crash
}

// settleSnapshot keeps a snapshot the host finished and the store recorded
// whole, and rolls back anything less: the host's part is deleted (an
// absent snapshot is no error) and so is the reserved name.
func (m *Manager) settleSnapshot(ctx context.Context, o *vmOp, in *opIntent) error {
	name := o.r.Spec.Name
	s, _, err := m.snapshot(ctx, name, in.Snapshot)
	if err == nil && s.Operation != nil {
		o.r.CurrentSnapshot = in.Snapshot
		return nil
	}
	if err != nil && !errors.Is(err, ErrNotFound) {
		return err
	}
	if _, err := hostproto.SnapshotDelete.Call(ctx, m.hostNamed(o.r.Host), hostproto.SnapshotRequest{VM: name, Snapshot: in.Snapshot}); err != nil {
		return fmt.Errorf("roll back snapshot %s: %w", in.Snapshot, err)
	}
	if err := m.store.Delete(ctx, snapKey(name, in.Snapshot)); err != nil {
		return err
	}
	o.publish(api.Event{Type: "snapshot.rolled-back", VM: name, Host: o.r.Host, Message: in.Snapshot})
	return nil
}

// settleSnapshotDelete finishes a snapshot delete (both halves are
// idempotent).
func (m *Manager) settleSnapshotDelete(ctx context.Context, o *vmOp, in *opIntent) error {
	name := o.r.Spec.Name
	s, _, err := m.snapshot(ctx, name, in.Snapshot)
	if errors.Is(err, ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	if _, err := hostproto.SnapshotDelete.Call(ctx, m.hostNamed(o.r.Host), hostproto.SnapshotRequest{VM: name, Snapshot: in.Snapshot}); err != nil {
		return err
	}
	if err := m.forgetSnapshot(ctx, name, s); err != nil && !errors.Is(err, store.ErrNotFound) {
		return err
	}
	if o.r.CurrentSnapshot == in.Snapshot {
		o.r.CurrentSnapshot = s.Parent
	}
	return nil
}
