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

// snapshotRecord is a restore point as stored under
// "snapshots/<vm>/<snapshot>". Its place in the tree is its parent: the
// snapshot the VM descended from when it was taken.
type snapshotRecord struct {
	Name           string           `json:"name"`
	Parent         string           `json:"parent,omitempty"`
	Created        time.Time        `json:"created"`
	IncludesMemory bool             `json:"includes_memory"`
	VMState        api.VMState      `json:"vm_state"`
	Spec           hostproto.VMSpec `json:"spec"` // the hardware settings at that moment
	Operation      *api.Operation   `json:"operation,omitempty"`
	// Quiesced: the disk was taken with the guest's file systems frozen
	// (a stopped VM's disk is as consistent).
	Quiesced bool `json:"quiesced,omitempty"`
}

func snapKey(vm, snap string) string { return "snapshots/" + vm + "/" + snap }

func (m *Manager) snapshots(ctx context.Context, vm string) ([]snapshotRecord, error) {
	kvs, err := m.store.List(ctx, "snapshots/"+vm+"/")
	if err != nil {
		return nil, wrapf(ErrUnavailable, err, "list snapshots of %s", vm)
	}
	out := make([]snapshotRecord, 0, len(kvs))
	for _, kv := range kvs {
		var s snapshotRecord
		if err := json.Unmarshal(kv.Value, &s); err != nil {
			m.log.Error("skipping unreadable snapshot record", "key", kv.Key, "err", err)
			continue
		}
		out = append(out, s)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Created.Before(out[j].Created) })
	return out, nil
}

func (m *Manager) snapshot(ctx context.Context, vm, snap string) (snapshotRecord, int64, error) {
	var s snapshotRecord
	rev, err := m.store.Get(ctx, snapKey(vm, snap), &s)
	if errors.Is(err, store.ErrNotFound) {
		return s, 0, errorf(ErrNotFound, "vm %s has no snapshot %s: see 'vigil snapshot list %s'", vm, snap, vm)
	}
	if err != nil {
		return s, 0, wrapf(ErrUnavailable, err, "read snapshot %s of %s", snap, vm)
	}
	return s, rev, nil
}

// stateForSnapshot says which VM states a snapshot can be taken in.
func snapshotAllowed(s api.VMState) bool {
	switch s {
	case api.StateRunning, api.StatePaused, api.StateStopped, api.StateSuspended:
		return true
	}
	return false
}

// CreateSnapshot takes a restore point of a VM, in named steps: reserve the
// name in the store (so a crash after the host acted leaves a record to
// find, not an orphan inside the disk image), take it on the host, record
// its figures and make it the VM's current snapshot.
func (m *Manager) CreateSnapshot(ctx context.Context, vm string, req api.SnapshotCreateRequest) (api.Snapshot, error) {
	if err := validName(vm); err != nil {
		return api.Snapshot{}, err
	}
	if !dnsLabel.MatchString(req.Name) {
		return api.Snapshot{}, errorf(ErrInvalid, "invalid snapshot name %q: it must be a DNS label of 1-63 lower-case letters, digits and '-'", req.Name)
	}
	if _, _, err := m.snapshot(ctx, vm, req.Name); err == nil {
		return api.Snapshot{}, errorf(ErrConflict, "vm %s already has a snapshot %s: pick another name or delete it first", vm, req.Name)
	}
	o, err := m.begin(ctx, vm, opSnapshot, func(o *vmOp) error {
		if !snapshotAllowed(o.r.State) {
			return errorf(ErrConflict, "vm %s is %s: a snapshot needs it running, paused, suspended or stopped", vm, o.r.State)
		}
		o.intent.Snapshot = req.Name
		return nil
	})
	if err != nil {
		return api.Snapshot{}, err
	}
	ctx, cancel := detach(ctx)
	defer cancel()
	defer o.end(ctx)
	r := o.r
	act := m.actual(r)
	memory := !req.NoMemory && (act.Running || act.SavedState)
	s := snapshotRecord{Name: req.Name, Parent: r.CurrentSnapshot, Created: time.Now().UTC(), IncludesMemory: memory,
		VMState: r.State, Spec: r.Spec}
	h := m.hostNamed(r.Host)
	var rev int64
	var res hostproto.SaveResult
	err = o.run(ctx, opSnapshot, []step{
		{name: "reserve",
			do: func(ctx context.Context) (err error) {
				rev, err = m.store.Create(ctx, snapKey(vm, req.Name), s)
				if errors.Is(err, store.ErrExists) {
					return errorf(ErrConflict, "vm %s already has a snapshot %s: pick another name or delete it first", vm, req.Name)
				}
				return err
			},
			undo: func(ctx context.Context) error { return m.store.Delete(ctx, snapKey(vm, req.Name)) }},
		{name: "take",
			do: func(ctx context.Context) (err error) {
				res, err = hostproto.SnapshotCreate.Call(ctx, h, hostproto.SnapshotRequest{VM: vm, Snapshot: req.Name, Memory: memory, NoQuiesce: req.NoQuiesce})
				return err
			},
			undo: func(ctx context.Context) error {
				_, err := hostproto.SnapshotDelete.Call(ctx, h, hostproto.SnapshotRequest{VM: vm, Snapshot: req.Name})
				return err
			}},
		{name: "record",
			do: func(ctx context.Context) error {
				s.Operation, s.Quiesced = operation("snapshot", res), res.Quiesced
				_, err := m.store.Update(ctx, snapKey(vm, req.Name), rev, s)
				if err == nil {
					m.metrics.observeOp(s.Operation)
				}
				return err
			}},
	})
	if err != nil {
		return api.Snapshot{}, fmt.Errorf("snapshot vm %s: %w", vm, err)
	}
	o.r.CurrentSnapshot = req.Name
	o.publish(api.Event{Type: "snapshot.created", VM: vm, Host: r.Host, Message: req.Name})
	if err := o.release(ctx); err != nil {
		return api.Snapshot{}, err
	}
	return s.view(req.Name, nil), nil
}

func (s snapshotRecord) view(current string, space map[string]int64) api.Snapshot {
	consistency := "crash"
	switch {
	case s.IncludesMemory:
		consistency = "memory"
	case s.Quiesced || s.VMState == api.StateStopped:
		consistency = "application"
	}
	return api.Snapshot{Name: s.Name, Parent: s.Parent, Created: s.Created, IncludesMemory: s.IncludesMemory,
		Consistency: consistency, SizeBytes: space[s.Name], Current: s.Name == current, VMState: s.VMState,
		MemoryBytes: s.Spec.MemoryBytes, CPUs: s.Spec.CPUs, Operation: s.Operation}
}

// ListSnapshots reports a VM's snapshots, oldest first, with their space.
func (m *Manager) ListSnapshots(ctx context.Context, vm string) (api.SnapshotList, error) {
	r, err := m.Get(ctx, vm)
	if err != nil {
		return api.SnapshotList{}, err
	}
	ss, err := m.snapshots(ctx, vm)
	if err != nil {
		return api.SnapshotList{}, err
	}
	space := map[string]int64{}
	if len(ss) > 0 {
		sp, err := hostproto.SnapshotSpace.Call(ctx, m.hostNamed(r.Host), hostproto.VMRef{VM: vm})
		if err != nil {
			m.log.Warn("snapshot space unknown", "vm", vm, "err", err)
		}
		if sp.Bytes != nil {
			space = sp.Bytes
		}
	}
	out := api.SnapshotList{VM: vm, Snapshots: []api.Snapshot{}}
	for _, s := range ss {
		v := s.view(r.CurrentSnapshot, space)
		out.TotalBytes += v.SizeBytes
		out.Snapshots = append(out.Snapshots, v)
	}
	return out, nil
}

// RevertSnapshot returns the VM to a snapshot: running from that instant if
// it holds memory, powered off at that disk state if not. The hardware
// settings return to the snapshot's. Whatever the VM was doing is discarded,
// a suspended VM's saved state included.
func (m *Manager) RevertSnapshot(ctx context.Context, vm, snap string) (api.VM, error) {
	if err := validName(vm); err != nil {
		return api.VM{}, err
	}
	s, _, err := m.snapshot(ctx, vm, snap)
	if err != nil {
		return api.VM{}, err
	}
	o, err := m.begin(ctx, vm, opRevert, func(o *vmOp) error {
		if !snapshotAllowed(o.r.State) && o.r.State != api.StateCrashed {
			return errorf(ErrConflict, "vm %s is %s: wait until it is running, paused, suspended, stopped or crashed", vm, o.r.State)
		}
		o.intent.Snapshot = snap
		return nil
	})
	if err != nil {
		return api.VM{}, err
	}
	ctx, cancel := detach(ctx)
	defer cancel()
	defer o.end(ctx)
	t0 := time.Now()
	if _, err := hostproto.SnapshotRevert.Call(ctx, m.hostNamed(o.r.Host), hostproto.SnapshotRequest{VM: vm, Snapshot: snap, Memory: s.IncludesMemory}); err != nil {
		// The host checks the memory file before discarding anything; after
		// that, the VM is whatever the reconciler finds.
		if errors.Is(err, hostproto.ErrBadState) {
			return m.view(o.r), &kindError{kind: ErrConflict, err: err, full: true, msg: fmt.Sprintf("cannot revert vm %s to %s: %v; the vm was not changed", vm, snap, err)}
		}
		o.end(ctx)
		m.queue.Add(vm)
		return m.view(o.r), fmt.Errorf("revert vm %s to %s: %w", vm, snap, err)
	}
	o.r.Spec.MemoryBytes, o.r.Spec.CPUs = s.Spec.MemoryBytes, s.Spec.CPUs
	o.r.CurrentSnapshot = snap
	o.r.LastOperation = &api.Operation{Action: "revert", DurationMS: ms(time.Since(t0))}
	m.metrics.observeOp(o.r.LastOperation)
	state := api.StateStopped
	o.r.Desired = desiredStopped
	if s.IncludesMemory {
		state, o.r.Desired = api.StateRunning, desiredRunning
	}
	o.publish(api.Event{Type: "snapshot.reverted", VM: vm, Host: o.r.Host, Message: snap})
	if err := o.finish(ctx, state, "reverted to "+snap); err != nil {
		return m.view(o.r), err
	}
	return m.view(o.r), nil
}

// DeleteSnapshot removes one snapshot. Its children stay valid: they are
// re-parented to its parent.
func (m *Manager) DeleteSnapshot(ctx context.Context, vm, snap string) error {
	if err := validName(vm); err != nil {
		return err
	}
	s, _, err := m.snapshot(ctx, vm, snap)
	if err != nil {
		return err
	}
	o, err := m.begin(ctx, vm, opSnapDel, func(o *vmOp) error {
		o.intent.Snapshot = snap
		return nil
	})
	if err != nil {
		return err
	}
	ctx, cancel := detach(ctx)
	defer cancel()
	defer o.end(ctx)
	if _, err := hostproto.SnapshotDelete.Call(ctx, m.hostNamed(o.r.Host), hostproto.SnapshotRequest{VM: vm, Snapshot: snap}); err != nil {
		return fmt.Errorf("delete snapshot %s of %s: %w", snap, vm, err)
	}
	if err := m.forgetSnapshot(ctx, vm, s); err != nil {
		return err
	}
	if o.r.CurrentSnapshot == snap {
		o.r.CurrentSnapshot = s.Parent
	}
	o.publish(api.Event{Type: "snapshot.deleted", VM: vm, Host: o.r.Host, Message: snap})
	return o.release(ctx)
}

// forgetSnapshot removes a snapshot's record, re-parenting its children.
func (m *Manager) forgetSnapshot(ctx context.Context, vm string, s snapshotRecord) error {
	ss, err := m.snapshots(ctx, vm)
	if err != nil {
		return err
	}
	for _, c := range ss {
		if c.Parent != s.Name {
			continue
		}
		var cur snapshotRecord
		crev, err := m.store.Get(ctx, snapKey(vm, c.Name), &cur)
		if err != nil {
			return wrapf(ErrUnavailable, err, "re-parent snapshot %s", c.Name)
		}
		cur.Parent = s.Parent
		if _, err := m.store.Update(ctx, snapKey(vm, c.Name), crev, cur); err != nil {
			return wrapf(ErrUnavailable, err, "re-parent snapshot %s", c.Name)
		}
	}
	if err := m.store.Delete(ctx, snapKey(vm, s.Name)); err != nil {
		return wrapf(ErrUnavailable, err, "delete snapshot %s of %s", s.Name, vm)
	}
	return nil
}
