package main

import (
	"context"
	"fmt"
	"path/filepath"
	"time"

	"github.com/digitalocean/go-libvirt"

	"github.com/vigil-project/vigil/api"
)

// libvirtCompare measures Vigil against libvirt on the same machine, in the
// same run, runs alternated: start → first heartbeat, pause + resume, save
// and restore, snapshot with memory and revert, force stop. Both guests run
// the same kernel, initramfs and command line on the same QEMU; libvirt is
// driven over its own RPC protocol (no virsh process per call), as Vigil is
// over its API. The daemons' idle cost is its own section (idle).
func (b *bench) libvirtCompare(ctx context.Context) ([]row, error) {
	d, err := startLibvirtd(ctx, filepath.Join(b.tmp, "libvirt"), b.accel)
	if err != nil {
		return nil, err
	}
	defer d.stop()
	const name, mem = "cmp1", 128 << 20
	if _, err := b.c.CreateVM(ctx, api.VMCreateRequest{Name: name, MemoryBytes: mem, CPUs: 1, DiskBytes: 256 << 20, Start: true}); err != nil {
		return nil, err
	}
	defer b.c.DeleteVM(context.WithoutCancel(ctx), name, true)
	if _, err := b.c.WaitGuest(ctx, name); err != nil {
		return nil, err
	}
	g := libvirtDomain{Name: "lvbench1", Dir: filepath.Join(d.dir, "lvbench1"), Kernel: b.img.Kernel, Initrd: b.img.Initrd,
		Cmdline: b.img.Cmdline + " vigil.name=lvbench1", MemoryMiB: mem >> 20}
	dom, err := d.define(ctx, g)
	if err != nil {
		return nil, err
	}
	if err := d.conn.DomainCreate(dom); err != nil {
		return nil, fmt.Errorf("libvirt: start: %w", err)
	}
	if err := nextHeartbeat(g.agentSocket(), 60*time.Second); err != nil {
		return nil, fmt.Errorf("libvirt: %w", err)
	}
	var rows []row
	add := func(what string, vigil, lv []time.Duration, f func(time.Duration) string, note string) {
		rows = append(rows, row{what: what, vigil: pct90(vigil, f), baseline: pct90(lv, f),
			ratio: ratio(float64(p(vigil, 50)), float64(p(lv, 50))), note: appendNote("p50 ratio", note)})
	}
	heartbeat := func() error { return nextHeartbeat(g.agentSocket(), 60*time.Second) }

	// Force stop, then start → first heartbeat (both disks formatted by now).
	var vStop, lStop, vStart, lStart []time.Duration
	for i := 0; i < b.runs; i++ {
		t0 := time.Now()
		if _, err := b.c.ChangeState(ctx, name, api.VMStateRequest{Action: api.ActionStop, Force: true}); err != nil {
			return rows, err
		}
		vStop = append(vStop, time.Since(t0))
		t0 = time.Now()
		if _, err := b.c.ChangeState(ctx, name, api.VMStateRequest{Action: api.ActionStart}); err != nil {
			return rows, err
		}
		if _, err := b.c.WaitGuest(ctx, name); err != nil {
			return rows, err
		}
		vStart = append(vStart, time.Since(t0))

		t0 = time.Now()
		if err := d.conn.DomainDestroy(dom); err != nil {
			return rows, fmt.Errorf("libvirt: destroy: %w", err)
		}
		lStop = append(lStop, time.Since(t0))
		t0 = time.Now()
		if err := d.conn.DomainCreate(dom); err != nil {
			return rows, fmt.Errorf("libvirt: start: %w", err)
		}
		if err := heartbeat(); err != nil {
			return rows, fmt.Errorf("libvirt: %w", err)
		}
		lStart = append(lStart, time.Since(t0))
	}
	add(fmt.Sprintf("vs libvirt: start a stopped VM → first heartbeat (128 MiB; %d runs)", b.runs), vStart, lStart, ms,
		"Vigil: `start` until the API reports the guest's heartbeat; libvirt: virDomainCreate, then the heartbeat read from the agent socket directly")
	add("vs libvirt: force stop", vStop, lStop, ms,
		"Vigil: `stop --force` (SIGKILL, until recorded stopped); libvirt: virDomainDestroy (SIGTERM, then SIGKILL after 10 s: QEMU exits on the SIGTERM)")

	// Pause + resume in blocks of 10 alternating, the first block of each
	// not counted.
	const pairs, block = 100, 10
	var vPair, lPair []time.Duration
	for i := 0; i < pairs/block+1; i++ {
		v, err := sample(block, func() error {
			if _, err := b.c.ChangeState(ctx, name, api.VMStateRequest{Action: api.ActionPause}); err != nil {
				return err
			}
			_, err := b.c.ChangeState(ctx, name, api.VMStateRequest{Action: api.ActionResume})
			return err
		})
		if err != nil {
			return rows, err
		}
		l, err := sample(block, func() error {
			if err := d.conn.DomainSuspend(dom); err != nil {
				return err
			}
			return d.conn.DomainResume(dom)
		})
		if err != nil {
			return rows, fmt.Errorf("libvirt: suspend/resume: %w", err)
		}
		if i > 0 {
			vPair, lPair = append(vPair, v...), append(lPair, l...)
		}
	}
	add(fmt.Sprintf("vs libvirt: pause + resume through the API (%d pairs)", pairs), vPair, lPair, ms2,
		"virDomainSuspend + virDomainResume; blocks of 10 alternating")

	// Save to disk and restore (libvirt: managed save, then start).
	var vSave, lSave, vRun, lRun, vHB, lHB []time.Duration
	for i := 0; i < b.runs; i++ {
		t0 := time.Now()
		if _, err := b.c.ChangeState(ctx, name, api.VMStateRequest{Action: api.ActionPause, ToDisk: true}); err != nil {
			return rows, err
		}
		vSave = append(vSave, time.Since(t0))
		t0 = time.Now()
		if _, err := b.c.ChangeState(ctx, name, api.VMStateRequest{Action: api.ActionResume}); err != nil {
			return rows, err
		}
		vRun = append(vRun, time.Since(t0))
		if _, err := b.c.WaitGuest(ctx, name); err != nil {
			return rows, err
		}
		vHB = append(vHB, time.Since(t0))

		t0 = time.Now()
		if err := d.conn.DomainManagedSave(dom, 0); err != nil {
			return rows, fmt.Errorf("libvirt: managed save: %w", err)
		}
		lSave = append(lSave, time.Since(t0))
		t0 = time.Now()
		if err := d.conn.DomainCreate(dom); err != nil {
			return rows, fmt.Errorf("libvirt: restore: %w", err)
		}
		lRun = append(lRun, time.Since(t0))
		if err := heartbeat(); err != nil {
			return rows, fmt.Errorf("libvirt: after restore: %w", err)
		}
		lHB = append(lHB, time.Since(t0))
	}
	add(fmt.Sprintf("vs libvirt: save to disk (128 MiB; %d runs)", b.runs), vSave, lSave, ms,
		"Vigil: `pause --to-disk` (checksummed state file, fsynced); libvirt: virDomainManagedSave")
	add("vs libvirt: restore from disk → running", vRun, lRun, ms, "Vigil: `resume`; libvirt: virDomainCreate of the saved domain")
	add("vs libvirt: restore from disk → the guest's next heartbeat", vHB, lHB, ms,
		"Vigil asks the restored guest for a heartbeat at once; libvirt's guest sends its next one on its 1 s ticker")

	// Snapshot with memory (libvirt: an internal snapshot, its default for
	// qcow2, made by QEMU's savevm), then revert to each.
	// libvirt's pause from its suspended and resumed events as they arrive
	// (it does not pass QEMU's STOP and RESUME on, with their timestamps,
	// as Vigil's host agent reads them): one RPC delivery late at each end.
	evCtx, stopEvents := context.WithCancel(ctx)
	events, err := d.conn.LifecycleEvents(evCtx)
	if err != nil {
		stopEvents()
		return rows, fmt.Errorf("libvirt: events: %w", err)
	}
	defer func() {
		// go-libvirt's relay blocks on each event until it is read.
		stopEvents()
		go func() {
			for range events {
			}
		}()
	}()
	var vPaused, lPaused, vSnap, lSnap []time.Duration
	var snaps []libvirt.DomainSnapshot
	for i := 0; i < b.runs; i++ {
		t0 := time.Now()
		s, err := b.c.CreateSnapshot(ctx, name, api.SnapshotCreateRequest{Name: fmt.Sprintf("s%d", i)})
		if err != nil {
			return rows, err
		}
		vSnap, vPaused = append(vSnap, time.Since(t0)), append(vPaused, msDur(s.Operation.PausedMS))

		drain(events)
		// The events are timed as they come, while the call runs.
		span := make(chan spanResult, 1)
		go func() {
			d, err := pausedSpan(events)
			span <- spanResult{d, err}
		}()
		t0 = time.Now()
		snap, err := d.conn.DomainSnapshotCreateXML(dom, fmt.Sprintf("<domainsnapshot><name>s%d</name></domainsnapshot>", i), 0)
		if err != nil {
			return rows, fmt.Errorf("libvirt: snapshot: %w", err)
		}
		lSnap = append(lSnap, time.Since(t0))
		snaps = append(snaps, snap)
		sp := <-span
		if sp.err != nil {
			return rows, fmt.Errorf("libvirt: snapshot: %w", sp.err)
		}
		lPaused = append(lPaused, sp.d)
	}
	add(fmt.Sprintf("vs libvirt: snapshot with memory, guest paused (128 MiB; %d runs)", b.runs), vPaused, lPaused, ms,
		"Vigil: from QEMU's STOP and RESUME timestamps; libvirt: from its suspended and resumed events as they arrive (it does not pass QEMU's on)")
	add("vs libvirt: snapshot with memory, command time", vSnap, lSnap, ms,
		"Vigil: qcow2 internal snapshot of the disk at the switchover + checksummed memory state file, fsynced; libvirt: internal snapshot (QEMU savevm into the qcow2)")
	var vRev, lRev, vRevHB, lRevHB []time.Duration
	for i := 0; i < b.runs; i++ {
		t0 := time.Now()
		if _, err := b.c.RevertSnapshot(ctx, name, fmt.Sprintf("s%d", i)); err != nil {
			return rows, err
		}
		vRev = append(vRev, time.Since(t0))
		if _, err := b.c.WaitGuest(ctx, name); err != nil {
			return rows, err
		}
		vRevHB = append(vRevHB, time.Since(t0))
		t0 = time.Now()
		if err := d.conn.DomainRevertToSnapshot(snaps[i], uint32(libvirt.DomainSnapshotRevertRunning)); err != nil {
			return rows, fmt.Errorf("libvirt: revert: %w", err)
		}
		lRev = append(lRev, time.Since(t0))
		if err := heartbeat(); err != nil {
			return rows, fmt.Errorf("libvirt: after revert: %w", err)
		}
		lRevHB = append(lRevHB, time.Since(t0))
	}
	add(fmt.Sprintf("vs libvirt: revert to a memory snapshot → running (%d runs)", b.runs), vRev, lRev, ms,
		"Vigil starts a fresh QEMU from the snapshot's state file; libvirt loads it into the running QEMU (loadvm)")
	add("vs libvirt: revert → the guest's next heartbeat", vRevHB, lRevHB, ms, "")
	return rows, nil
}

func drain(events <-chan libvirt.DomainEventLifecycleMsg) {
	for {
		select {
		case <-events:
		default:
			return
		}
	}
}

type spanResult struct {
	d   time.Duration
	err error
}

// pausedSpan is the time between libvirt's suspended event and its next
// resumed event, as they arrive.
func pausedSpan(events <-chan libvirt.DomainEventLifecycleMsg) (time.Duration, error) {
	var t0 time.Time
	timeout := time.After(30 * time.Second)
	for {
		select {
		case e, ok := <-events:
			if !ok {
				return 0, fmt.Errorf("the event stream ended")
			}
			switch {
			case e.Event == int32(libvirt.DomainEventSuspended):
				t0 = time.Now()
			case e.Event == int32(libvirt.DomainEventResumed) && !t0.IsZero():
				return time.Since(t0), nil
			}
		case <-timeout:
			return 0, fmt.Errorf("no suspended and resumed events")
		}
	}
}

// pct90 is a series as p50, p90 and p99, each formatted with f.
func pct90(ds []time.Duration, f func(time.Duration) string) string {
	return "p50 " + f(p(ds, 50)) + ", p90 " + f(p(ds, 90)) + ", p99 " + f(p(ds, 99))
}
