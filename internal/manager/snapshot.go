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

// CreateSnapshot takes a restore point of a VM.
func (m *Manager) CreateSnapshot(ctx context.Context, vm string, req api.SnapshotCreateRequest) (api.Snapshot, error) {
	if err := validName(vm); err != nil {
		return api.Snapshot{}, err
	}
	if !dnsLabel.MatchString(req.Name) {
		return api.Snapshot{}, errorf(ErrInvalid, "invalid snapshot name %q: it must be a DNS label of 1-63 lower-case letters, digits and '-'", req.Name)
	}
	unlock, err := m.lock(vm)
	if err != nil {
		return api.Snapshot{}, err
	}
	defer unlock()
	r, _, err := m.load(ctx, vm)
	if err != nil {
		return api.Snapshot{}, err
	}
	if !snapshotAllowed(r.State) {
		return api.Snapshot{}, errorf(ErrConflict, "vm %s is %s: a snapshot needs it running, paused, suspended or stopped", vm, r.State)
	}
	if _, _, err := m.snapshot(ctx, vm, req.Name); err == nil {
		return api.Snapshot{}, errorf(ErrConflict, "vm %s already has a snapshot %s: pick another name or delete it first", vm, req.Name)
	}
	act := m.actual(r)
	memory := !req.NoMemory && (act.Running || act.SavedState)
	s := snapshotRecord{Name: req.Name, Parent: r.CurrentSnapshot, Created: time.Now().UTC(), IncludesMemory: memory,
		VMState: r.State, Spec: r.Spec}
	// Reserve the name first, so a crash after the host acted leaves a record
	// to find rather than an orphan inside the disk image.
	rev, err := m.store.Create(ctx, snapKey(vm, req.Name), s)
	if err != nil {
		return api.Snapshot{}, wrapf(ErrUnavailable, err, "record snapshot %s of %s", req.Name, vm)
	}
	res, err := m.hostNamed(r.Host).SnapshotCreate(ctx, vm, req.Name, memory)
	if err != nil {
		m.store.Delete(context.WithoutCancel(ctx), snapKey(vm, req.Name))
		return api.Snapshot{}, fmt.Errorf("snapshot vm %s: %w", vm, err)
	}
	s.Operation = operation("snapshot", res)
	if _, err := m.store.Update(ctx, snapKey(vm, req.Name), rev, s); err != nil {
		return api.Snapshot{}, wrapf(ErrUnavailable, err, "record snapshot %s of %s", req.Name, vm)
	}
	if err := m.setCurrent(ctx, vm, req.Name); err != nil {
		return api.Snapshot{}, err
	}
	m.publish(api.Event{Type: "snapshot.created", VM: vm, Host: r.Host, Message: req.Name})
	out := s.view(req.Name, nil)
	return out, nil
}

// setCurrent re-reads the VM record (the state may have moved on) and sets
// its current snapshot.
func (m *Manager) setCurrent(ctx context.Context, vm, snap string) error {
	r, rev, err := m.load(ctx, vm)
	if err != nil {
		return err
	}
	r.CurrentSnapshot = snap
	_, err = m.save(ctx, &r, rev)
	return err
}

func (s snapshotRecord) view(current string, space map[string]int64) api.Snapshot {
	return api.Snapshot{Name: s.Name, Parent: s.Parent, Created: s.Created, IncludesMemory: s.IncludesMemory,
		SizeBytes: space[s.Name], Current: s.Name == current, VMState: s.VMState,
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
		if space, err = m.hostNamed(r.Host).SnapshotSpace(vm); err != nil {
			m.log.Warn("snapshot space unknown", "vm", vm, "err", err)
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
	unlock, err := m.lock(vm)
	if err != nil {
		return api.VM{}, err
	}
	defer unlock()
	r, rev, err := m.load(ctx, vm)
	if err != nil {
		return api.VM{}, err
	}
	s, _, err := m.snapshot(ctx, vm, snap)
	if err != nil {
		return api.VM{}, err
	}
	if !snapshotAllowed(r.State) && r.State != api.StateCrashed {
		return m.view(r), errorf(ErrConflict, "vm %s is %s: wait until it is running, paused, suspended, stopped or crashed", vm, r.State)
	}
	t0 := time.Now()
	if err := m.hostNamed(r.Host).SnapshotRevert(ctx, vm, snap, s.IncludesMemory); err != nil {
		// The host checks the memory file before discarding anything; after
		// that, the VM is whatever the reconciler finds.
		if errors.Is(err, hostproto.ErrBadState) {
			return m.view(r), &kindError{kind: ErrConflict, err: err, full: true, msg: fmt.Sprintf("cannot revert vm %s to %s: %v; the vm was not changed", vm, snap, err)}
		}
		m.Reconcile(context.WithoutCancel(ctx), vm)
		return m.view(r), fmt.Errorf("revert vm %s to %s: %w", vm, snap, err)
	}
	r.Spec.MemoryBytes, r.Spec.CPUs = s.Spec.MemoryBytes, s.Spec.CPUs
	r.CurrentSnapshot = snap
	r.LastOperation = &api.Operation{Action: "revert", DurationMS: ms(time.Since(t0))}
	state := api.StateStopped
	r.Desired = desiredStopped
	if s.IncludesMemory {
		state, r.Desired = api.StateRunning, desiredRunning
	}
	if _, err := m.setState(ctx, &r, rev, state, "reverted to "+snap); err != nil {
		return m.view(r), err
	}
	m.publish(api.Event{Type: "snapshot.reverted", VM: vm, Host: r.Host, Message: snap})
	return m.view(r), nil
}

// DeleteSnapshot removes one snapshot. Its children stay valid: they are
// re-parented to its parent.
func (m *Manager) DeleteSnapshot(ctx context.Context, vm, snap string) error {
	if err := validName(vm); err != nil {
		return err
	}
	unlock, err := m.lock(vm)
	if err != nil {
		return err
	}
	defer unlock()
	r, rev, err := m.load(ctx, vm)
	if err != nil {
		return err
	}
	s, _, err := m.snapshot(ctx, vm, snap)
	if err != nil {
		return err
	}
	if err := m.hostNamed(r.Host).SnapshotDelete(ctx, vm, snap); err != nil {
		return fmt.Errorf("delete snapshot %s of %s: %w", snap, vm, err)
	}
	ss, err := m.snapshots(ctx, vm)
	if err != nil {
		return err
	}
	for _, c := range ss {
		if c.Parent != snap {
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
	if err := m.store.Delete(ctx, snapKey(vm, snap)); err != nil {
		return wrapf(ErrUnavailable, err, "delete snapshot %s of %s", snap, vm)
	}
	if r.CurrentSnapshot == snap {
		r.CurrentSnapshot = s.Parent
		if _, err := m.save(ctx, &r, rev); err != nil {
			return err
		}
	}
	m.publish(api.Event{Type: "snapshot.deleted", VM: vm, Host: r.Host, Message: snap})
	return nil
}
