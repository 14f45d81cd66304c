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
func (b *bench) snapshots(ctx context.Context) ([]row, error) {
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
		for i := 0; i < 3; i++ {
			s, err := b.c.CreateSnapshot(ctx, name, api.SnapshotCreateRequest{Name: fmt.Sprintf("s%d", i)})
			if err != nil {
				return nil, err
			}
			paused = append(paused, time.Duration(s.Operation.PausedMS*float64(time.Millisecond)))
			total = append(total, time.Duration(s.Operation.DurationMS*float64(time.Millisecond)))
		}
		var revert, revertHB []time.Duration
		for i := 0; i < 3; i++ {
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
		var save, load []time.Duration
		for i := 0; i < 3; i++ {
			t0 := time.Now()
			if out, err := bv.mon.HMP(ctx, fmt.Sprintf("savevm b%d", i)); err != nil || out != "" {
				bv.stop()
				return nil, fmt.Errorf("savevm: %v %q", err, out)
			}
			save = append(save, time.Since(t0))
		}
		for i := 0; i < 3; i++ {
			t0 := time.Now()
			if out, err := bv.mon.HMP(ctx, fmt.Sprintf("loadvm b%d", i)); err != nil || out != "" {
				bv.stop()
				return nil, fmt.Errorf("loadvm: %v %q", err, out)
			}
			load = append(load, time.Since(t0))
		}
		bv.stop()

		rows = append(rows,
			row{what: "Snapshot with memory, " + label + " guest: guest paused", vigil: ms1(median(paused)),
				baseline: ms1(median(save)) + " (HMP savevm: paused throughout)", ratio: fmt.Sprintf("%.3f", float64(median(paused))/float64(median(save))),
				note: "median of 3; live save, guest stopped only at switchover while the disk snapshot is taken"},
			row{what: "Snapshot with memory, " + label + " guest: total time", vigil: ms1(median(total)),
				baseline: ms1(median(save)) + " (HMP savevm)", ratio: fmt.Sprintf("%.2f", float64(median(total))/float64(median(save))),
				note: "median of 3"},
			row{what: "Revert to a memory snapshot, " + label + " guest: until running", vigil: ms1(median(revert)),
				baseline: ms1(median(load)) + " (HMP loadvm in a running QEMU)", ratio: fmt.Sprintf("%.2f", float64(median(revert))/float64(median(load))),
				note: fmt.Sprintf("median of 3; Vigil starts a fresh QEMU and verifies the state file; until next heartbeat %s", ms1(median(revertHB)))})
	}
	return rows, nil
}

func ms1(d time.Duration) string { return fmt.Sprintf("%.1f ms", float64(d)/float64(time.Millisecond)) }
