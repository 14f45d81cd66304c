package main

import (
	"context"
	"fmt"
	"time"

	"github.com/vigil-project/vigil/api"
)

// snapshots measures a full snapshot (disk + memory) of a running guest —
// how long the guest was paused and how long it took — and a revert, for a
// 128 MiB and a 1 GiB guest, against HMP savevm/loadvm on bare QEMU, which
// pause the guest for the whole memory dump (as vSphere and Proxmox do).
// Vigil's series comes first, then the baseline's: the two guests running at
// once would slow each other down.
func (b *bench) snapshots(ctx context.Context) ([]row, error) {
	pausedNote := "live save, guest stopped only at switchover while the disk snapshot is taken"
	if !b.livePrecopy() {
		pausedNote = "under TCG Vigil too stops the guest for the whole save (a live copy corrupted a busy guest on QEMU 7.2 TCG), so near 1; the save is live only under KVM"
	}
	var rows []row
	for _, mem := range []int64{128 << 20, 1 << 30} {
		label := fmt.Sprintf("%d MiB", mem>>20)
		if mem >= 1<<30 {
			label = fmt.Sprintf("%d GiB", mem>>30)
		}
		name := fmt.Sprintf("snap%d", mem>>20)
		if _, err := b.c.CreateVM(ctx, api.VMCreateRequest{Name: name, MemoryBytes: mem, CPUs: 1, DiskBytes: 256 << 20, Start: true}); err != nil {
			return nil, err
		}
		if _, err := b.c.WaitGuest(ctx, name); err != nil {
			return nil, err
		}
		var paused, total []time.Duration
		for i := 0; i < b.runs; i++ {
			s, err := b.c.CreateSnapshot(ctx, name, api.SnapshotCreateRequest{Name: fmt.Sprintf("s%d", i)})
			if err != nil {
				return nil, err
			}
			paused = append(paused, msDur(s.Operation.PausedMS))
			total = append(total, msDur(s.Operation.DurationMS))
		}
		var revert, revertHB []time.Duration
		for i := 0; i < b.runs; i++ {
			t0 := time.Now()
			if _, err := b.c.RevertSnapshot(ctx, name, fmt.Sprintf("s%d", i)); err != nil {
				return nil, err
			}
			revert = append(revert, time.Since(t0))
			if _, err := b.c.WaitGuest(ctx, name); err != nil {
				return nil, err
			}
			revertHB = append(revertHB, time.Since(t0))
		}
		b.c.DeleteVM(ctx, name, true)

		// Baseline: bare QEMU, HMP savevm / loadvm.
		m, err := b.bareMachine("bare-"+name, mem, "")
		if err != nil {
			return nil, err
		}
		bv, err := startBare(ctx, m)
		if err != nil {
			return nil, err
		}
		if err := nextHeartbeat(m.AgentSocket(), 60*time.Second); err != nil {
			bv.stop()
			return nil, err
		}
		// hmp times cmd ("savevm", "loadvm") on snapshots b0, b1, ...
		hmp := func(cmd string) ([]time.Duration, error) {
			i := 0
			return sample(b.runs, func() error {
				out, err := bv.mon.HMP(ctx, fmt.Sprintf("%s b%d", cmd, i))
				i++
				if err != nil || out != "" {
					return fmt.Errorf("%s: %v %q", cmd, err, out)
				}
				return nil
			})
		}
		save, err := hmp("savevm")
		if err != nil {
			bv.stop()
			return nil, err
		}
		load, err := hmp("loadvm")
		bv.stop()
		if err != nil {
			return nil, err
		}

		rows = append(rows,
			versus(fmt.Sprintf("Snapshot with memory, %s guest: guest paused (%d runs)", label, b.runs), paused, save, ms1,
				"HMP savevm: paused throughout", pausedNote),
			versus("Snapshot with memory, "+label+" guest: total time", total, save, ms1, "HMP savevm", ""),
			versus("Revert to a memory snapshot, "+label+" guest: until running", revert, load, ms1, "HMP loadvm in a running QEMU",
				"Vigil starts a fresh QEMU and verifies the state file; until next heartbeat "+pctWith(revertHB, ms1)))
	}
	return rows, nil
}
