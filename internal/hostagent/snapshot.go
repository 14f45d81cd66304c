package hostagent

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/vigil-project/vigil/internal/hostproto"
	"github.com/vigil-project/vigil/internal/qcow2"
	"github.com/vigil-project/vigil/internal/qemu"
	"github.com/vigil-project/vigil/internal/qemu/qmp"
	"github.com/vigil-project/vigil/internal/qga"
	"github.com/vigil-project/vigil/internal/statefile"
)

// Snapshots keep the disk as a qcow2 internal snapshot of the VM's disk
// image (taken live with blockdev-snapshot-internal-sync, or with qemu-img
// when no QEMU runs) and, when memory is included, the QEMU state in a state
// file beside it. Internal snapshots are independent of each other: any can
// be applied or deleted without touching the others, which is what a tree
// of restore points needs.

// SnapshotCreate takes snapshot snap of VM name. With memory (and a running
// or paused VM) it is a full restore point; the guest is stopped only for
// the final phase of a live save, while the disk is frozen.
func (a *Agent) SnapshotCreate(ctx context.Context, r hostproto.SnapshotRequest) (SaveResult, error) {
	if err := checkName("snapshot", r.Snapshot); err != nil {
		return SaveResult{}, err
	}
	v, err := a.get(r.VM)
	if err != nil {
		return SaveResult{}, err
	}
	defer v.lockOp("snapshot")()
	res, err := v.snapshotCreate(ctx, r)
	if err != nil {
		return res, err
	}
	// The firmware's variables (a UEFI VM's boot entries) are part of the
	// restore point.
	if err := v.saveVars(r.Snapshot); err != nil {
		v.deleteSnapshot(context.WithoutCancel(ctx), r.Snapshot)
		return SaveResult{}, fmt.Errorf("snapshot %s of %s: %w", r.Snapshot, r.VM, err)
	}
	return res, nil
}

func (v *vm) snapshotCreate(ctx context.Context, r hostproto.SnapshotRequest) (SaveResult, error) {
	name, snap, memory := r.VM, r.Snapshot, r.Memory
	start := time.Now()
	p, runState, err := v.running()
	if err != nil {
		// No QEMU: a disk-only snapshot with qemu-img, plus the saved state
		// of a suspended VM (hard-linked: state files are never modified).
		if err := qemu.DiskSnapshot(ctx, v.machine.Disk, "create", snap); err != nil {
			return SaveResult{}, err
		}
		res := SaveResult{Duration: time.Since(start)}
		if _, err := os.Stat(v.stateFile()); err == nil && memory {
			os.MkdirAll(filepath.Dir(v.snapshotFile(snap)), 0o755)
			if err := os.Link(v.stateFile(), v.snapshotFile(snap)); err != nil {
				qemu.DiskSnapshot(context.WithoutCancel(ctx), v.machine.Disk, "delete", snap)
				return SaveResult{}, fmt.Errorf("snapshot %s of %s: keep saved state: %w", snap, name, err)
			}
			res.Path = v.snapshotFile(snap)
		}
		return res, nil
	}
	diskSnap := func(ctx context.Context) error {
		return p.Monitor.Run(ctx, "blockdev-snapshot-internal-sync", map[string]any{"device": "disk0", "name": snap}, nil)
	}
	if !memory {
		res, err := v.diskOnlySnapshot(ctx, runState, !r.NoQuiesce, diskSnap)
		if err != nil {
			return SaveResult{}, fmt.Errorf("snapshot %s of %s: %w", snap, name, err)
		}
		res.Duration = time.Since(start)
		return res, nil
	}

	res, err := v.liveSnapshot(ctx, p, snap, runState, diskSnap)
	if err != nil && strings.Contains(err.Error(), "does not support internal snapshots") {
		// Seen once under heavy load: the image was left inactive by the
		// previous save although the guest had been continued. A cont
		// re-activates every image (QEMU's qmp_cont); then try once more.
		v.log.Warn("disk image inactive at snapshot; re-activating and retrying", "snapshot", snap)
		if runState != "paused" {
			p.Monitor.Cont(ctx)
		}
		res, err = v.liveSnapshot(ctx, p, snap, runState, diskSnap)
	}
	if err != nil {
		return SaveResult{}, err
	}
	res.Duration = time.Since(start)
	return res, nil
}

// liveSnapshot saves memory live and freezes the disk at switchover.
func (v *vm) liveSnapshot(ctx context.Context, p *qemu.Process, snap, runState string, diskSnap func(context.Context) error) (SaveResult, error) {
	name := v.spec.Name
	events, unsubscribe := p.Monitor.Subscribe()
	defer unsubscribe()
	w, err := v.createStateFile(v.snapshotFile(snap), statefile.KindSnapshot)
	if err != nil {
		return SaveResult{}, fmt.Errorf("snapshot %s of %s: %w", snap, name, err)
	}
	wasRunning := runState != "paused"
	tookDisk := false
	if wasRunning && !qemu.LivePrecopySafe(v.machine) {
		// Under TCG memory cannot be copied while the guest runs (see
		// qemu.LivePrecopySafe): it is stopped for the whole save.
		if err := p.Monitor.Stop(ctx); err != nil {
			w.Abort()
			return SaveResult{}, fmt.Errorf("snapshot %s of %s: stop the guest: %w", snap, name, err)
		}
	}
	stats, err := qemu.SaveState(ctx, p.Monitor, v.machine.Dir, w, qemu.SaveOptions{
		AtSwitchover: func(ctx context.Context) error {
			if err := diskSnap(ctx); err != nil {
				return err
			}
			tookDisk = true
			return nil
		},
		Progress: func(n int64) { v.progress("saving memory", n, v.spec.MemoryBytes) },
	})
	if wasRunning {
		// After a completed or failed save QEMU leaves the guest stopped.
		// Continue it before the file is synced: the guest need not wait
		// for our fsync.
		if cerr := p.Monitor.Cont(context.WithoutCancel(ctx)); cerr != nil && err == nil {
			err = cerr
		}
	}
	if err == nil {
		_, err = w.Commit()
	} else {
		w.Abort()
	}
	if err != nil {
		if tookDisk {
			p.Monitor.Run(context.WithoutCancel(ctx), "blockdev-snapshot-delete-internal-sync", map[string]any{"device": "disk0", "name": snap}, nil)
		}
		return SaveResult{}, fmt.Errorf("snapshot %s of %s: %w", snap, name, err)
	}
	return SaveResult{Path: v.snapshotFile(snap), Bytes: stats.Bytes, Paused: pausedFor(events, wasRunning)}, nil
}

// pausedFor measures from QEMU's own STOP and RESUME event timestamps how
// long the guest's CPUs were stopped by a save of a running guest. The
// monitor queues an event before the reply of the command that caused it,
// so once cont has returned its RESUME is on its way: wait for that one,
// not for a lull (waiting for 200 ms of quiet added 200 ms to every
// snapshot). A guest that was not running was not stopped.
func pausedFor(events <-chan qmp.Event, wasRunning bool) time.Duration {
	if !wasRunning {
		return 0
	}
	return qemu.StoppedFor(events)
}

// SnapshotRevert returns VM name to snapshot snap: whatever runs now is
// discarded (as is a saved suspend state), the disk becomes the snapshot's,
// and with memory the guest runs again from the snapshot's instant.
func (a *Agent) SnapshotRevert(ctx context.Context, r hostproto.SnapshotRequest) (hostproto.None, error) {
	name, snap, memory := r.VM, r.Snapshot, r.Memory
	if err := checkName("snapshot", snap); err != nil {
		return none(err)
	}
	v, err := a.get(name)
	if err != nil {
		return none(err)
	}
	defer v.lockOp("revert")()
	if memory {
		// Check the memory file before anything is thrown away.
		r, err := v.checkStateFile(v.snapshotFile(snap))
		if err != nil {
			return none(err)
		}
		r.Close()
	}
	if p, _, err := v.running(); err == nil {
		if err := v.killLocked(ctx, p); err != nil {
			return none(err)
		}
	}
	err = qemu.DiskSnapshot(ctx, v.machine.Disk, "apply", snap)
	// The killed QEMU has been reaped, yet qemu-img was once refused the
	// disk's write lock just after (a CI run; the holder was not found):
	// give it a few seconds before failing.
	for deadline := time.Now().Add(5 * time.Second); err != nil && strings.Contains(err.Error(), `"write" lock`) && time.Now().Before(deadline); {
		select {
		case <-ctx.Done():
			return none(ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
		err = qemu.DiskSnapshot(ctx, v.machine.Disk, "apply", snap)
	}
	if err != nil {
		if strings.Contains(err.Error(), "find") || strings.Contains(err.Error(), "exist") {
			return none(fmt.Errorf("%s of %s: %w", snap, name, ErrNoSnapshot))
		}
		return none(err)
	}
	os.Remove(v.stateFile())
	if err := v.restoreVars(snap); err != nil {
		return none(fmt.Errorf("revert %s to %s: %w", name, snap, err))
	}
	if !memory {
		return hostproto.None{}, nil
	}
	return none(v.startFromState(ctx, v.snapshotFile(snap)))
}

// SnapshotDelete removes snapshot snap; the others are untouched.
func (a *Agent) SnapshotDelete(ctx context.Context, r hostproto.SnapshotRequest) (hostproto.None, error) {
	name, snap := r.VM, r.Snapshot
	if err := checkName("snapshot", snap); err != nil {
		return none(err)
	}
	v, err := a.get(name)
	if err != nil {
		return none(err)
	}
	defer v.lockOp("snapshot-delete")()
	if err := v.deleteSnapshot(ctx, snap); err != nil {
		return none(fmt.Errorf("delete snapshot %s of %s: %w", snap, name, err))
	}
	return hostproto.None{}, nil
}

// deleteSnapshot removes a snapshot's disk part, memory and firmware
// variables (absent ones are fine); the caller holds opMu.
func (v *vm) deleteSnapshot(ctx context.Context, snap string) error {
	var err error
	if p, _, rerr := v.running(); rerr == nil {
		err = p.Monitor.Run(ctx, "blockdev-snapshot-delete-internal-sync", map[string]any{"device": "disk0", "name": snap}, nil)
	} else {
		err = qemu.DiskSnapshot(ctx, v.machine.Disk, "delete", snap)
	}
	if err != nil && !strings.Contains(err.Error(), "not found") && !strings.Contains(err.Error(), "not exist") && !strings.Contains(err.Error(), "find") {
		return err
	}
	for _, f := range []string{v.snapshotFile(snap), v.varsSnapshotFile(snap)} {
		if err := os.Remove(f); err != nil && !os.IsNotExist(err) {
			return err
		}
	}
	return nil
}

// SnapshotSpace reports, per snapshot, the bytes only it holds: disk
// clusters no other snapshot and not the current disk references, plus its
// memory file. Figures for a running VM may lag QEMU's metadata cache a little.
func (a *Agent) SnapshotSpace(_ context.Context, r hostproto.VMRef) (hostproto.Space, error) {
	v, err := a.get(r.VM)
	if err != nil {
		return hostproto.Space{}, err
	}
	u, err := qcow2.Inspect(v.machine.Disk)
	if err != nil {
		// A table caught mid-update by a running QEMU: try once more.
		time.Sleep(50 * time.Millisecond)
		if u, err = qcow2.Inspect(v.machine.Disk); err != nil {
			return hostproto.Space{}, err
		}
	}
	out := map[string]int64{}
	for _, s := range u.Snapshots {
		out[s.Name] = s.ExclusiveBytes
		if fi, err := os.Stat(v.snapshotFile(s.Name)); err == nil {
			out[s.Name] += fi.Size()
		}
	}
	return hostproto.Space{Bytes: out}, nil
}

// killLocked kills the VM's QEMU; the caller holds opMu.
func (v *vm) killLocked(ctx context.Context, p *qemu.Process) error {
	v.mu.Lock()
	v.stopping = true
	exited := v.exited
	v.mu.Unlock()
	if err := p.Kill(ctx); err != nil {
		return err
	}
	select {
	case <-exited:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// diskOnlySnapshot takes the disk of a running VM. With qemu-guest-agent
// answering, the guest's file systems are frozen around it (application
// consistent, like VMware's quiesced snapshots: flushed, and applications
// with freeze hooks at a safe point); otherwise the disk is taken as it is
// (crash consistent) and the result says why.
func (v *vm) diskOnlySnapshot(ctx context.Context, runState string, quiesce bool, diskSnap func(context.Context) error) (SaveResult, error) {
	cl := v.qgaClient()
	var note string
	switch {
	case !quiesce:
		note = "crash-consistent: taken without freezing the file systems, as asked"
	case runState == "paused":
		note = "crash-consistent: the vm was paused, so its file systems could not be frozen"
	case cl == nil:
		note = "crash-consistent: no qemu-guest-agent answered to freeze the file systems"
	}
	if note != "" {
		if err := diskSnap(ctx); err != nil {
			return SaveResult{}, err
		}
		return SaveResult{Note: note}, nil
	}
	fctx, cancel := context.WithTimeout(ctx, freezeTimeout)
	frozeAt := time.Now()
	n, ferr := cl.FSFreeze(fctx)
	cancel()
	if ferr != nil {
		// A freeze that failed half way may have frozen some: thaw them.
		v.thaw(ctx, cl)
		v.log.Warn("could not freeze the guest's file systems; taking a crash-consistent snapshot", "err", ferr)
		if err := diskSnap(ctx); err != nil {
			return SaveResult{}, err
		}
		return SaveResult{Note: "crash-consistent: freezing the file systems failed: " + ferr.Error()}, nil
	}
	err := diskSnap(ctx)
	thawErr := v.thaw(ctx, cl)
	frozen := time.Since(frozeAt)
	if err != nil {
		return SaveResult{}, err
	}
	res := SaveResult{Quiesced: true, Frozen: frozen, Note: fmt.Sprintf("application-consistent: %d file systems frozen for %s", n, frozen.Round(time.Millisecond))}
	if thawErr != nil {
		res.Note += "; thawing them failed: " + thawErr.Error()
	}
	return res, nil
}

// freezeTimeout bounds guest-fsfreeze-freeze: syncing a guest with much
// dirty data takes a while under TCG.
const freezeTimeout = time.Minute

// thaw thaws the guest's file systems, trying a few times: a guest left
// frozen blocks every write.
func (v *vm) thaw(ctx context.Context, cl *qga.Client) error {
	var err error
	for try := range 5 {
		tctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		_, err = cl.FSThaw(tctx)
		cancel()
		if err == nil {
			return nil
		}
		v.log.Warn("thaw of the guest's file systems failed", "try", try+1, "err", err)
		time.Sleep(time.Second)
	}
	return err
}
