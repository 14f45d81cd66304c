package integration

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vigil-project/vigil/api"
)

func listSnapshots(t *testing.T, a *devAgent, vm string) map[string]api.Snapshot {
	t.Helper()
	var ss []api.Snapshot
	out := a.mustVigil("snapshot", "list", vm, "-o", "json")
	if err := json.Unmarshal([]byte(out), &ss); err != nil {
		t.Fatalf("snapshot list -o json: %v\n%s", err, out)
	}
	m := map[string]api.Snapshot{}
	for _, s := range ss {
		m[s.Name] = s
	}
	return m
}

type point struct {
	boot string
	seq  uint64
}

func snap(t *testing.T, a *devAgent, vm, name string, args ...string) point {
	t.Helper()
	v := showVM(t, a, vm)
	a.mustVigil(append([]string{"snapshot", "create", vm, name}, args...)...)
	if v.Guest == nil {
		return point{}
	}
	return point{v.Guest.BootID, v.Guest.Seq}
}

// revertRunning reverts to a memory snapshot and checks the guest continues
// from that instant: same boot, heartbeat counter right after the snapshot's.
func revertRunning(t *testing.T, a *devAgent, vm, name string, at point, marker string) {
	t.Helper()
	var v api.VM
	json.Unmarshal([]byte(a.mustVigil("snapshot", "revert", vm, name, "--wait", "-o", "json")), &v)
	if v.State != api.StateRunning || v.Guest == nil || v.CurrentSnapshot != name {
		t.Fatalf("revert to %s: %+v", name, v)
	}
	if v.Guest.BootID != at.boot || v.Guest.Seq < at.seq || v.Guest.Seq > at.seq+3 {
		t.Fatalf("revert to %s: guest boot %s seq %d; the snapshot was taken at boot %s seq %d",
			name, v.Guest.BootID, v.Guest.Seq, at.boot, at.seq)
	}
	if got := execOut(t, a, vm, "cat /data/marker"); got != marker {
		t.Fatalf("after revert to %s /data/marker is %q, want %q", name, got, marker)
	}
}

// TestSnapshotTree takes full snapshots of a running guest, reverts across a
// branch, deletes a middle snapshot and reverts to its child, and checks
// disk-only snapshots, space accounting, persistence and deletion rules.
func TestSnapshotTree(t *testing.T) {
	needIntegration(t)
	a := newDevAgent(t)
	a.mustVigil("vm", "create", "web1", "--start", "--wait")

	execOut(t, a, "web1", "echo one > /data/marker; sync")
	p1 := snap(t, a, "web1", "s1")
	time.Sleep(2 * time.Second)
	execOut(t, a, "web1", "echo two > /data/marker; sync")
	p2 := snap(t, a, "web1", "s2")
	if p2.seq <= p1.seq {
		t.Fatalf("heartbeats did not advance between snapshots: %d, %d", p1.seq, p2.seq)
	}

	revertRunning(t, a, "web1", "s1", p1, "one")
	// A new snapshot after reverting to an old one makes a branch.
	time.Sleep(1500 * time.Millisecond)
	execOut(t, a, "web1", "echo three > /data/marker; sync")
	p3 := snap(t, a, "web1", "s3")
	ss := listSnapshots(t, a, "web1")
	if ss["s2"].Parent != "s1" || ss["s3"].Parent != "s1" || !ss["s3"].Current || ss["s1"].Current {
		t.Fatalf("tree after branching: %+v", ss)
	}
	for name, s := range ss {
		if !s.IncludesMemory || s.SizeBytes <= 0 || s.Created.IsZero() {
			t.Fatalf("snapshot %s: %+v", name, s)
		}
	}
	if table := a.mustVigil("snapshot", "list", "web1"); !strings.Contains(table, "├─ s2") || !strings.Contains(table, "└─ s3") || !strings.Contains(table, "total") {
		t.Fatalf("snapshot list table does not show the tree:\n%s", table)
	}

	revertRunning(t, a, "web1", "s2", p2, "two")

	// Delete the middle snapshot; its children stay valid.
	a.mustVigil("snapshot", "delete", "web1", "s1")
	ss = listSnapshots(t, a, "web1")
	if _, ok := ss["s1"]; ok || ss["s2"].Parent != "" || ss["s3"].Parent != "" {
		t.Fatalf("after deleting s1: %+v", ss)
	}
	revertRunning(t, a, "web1", "s3", p3, "three")

	// Disk-only snapshot of a running VM: the guest is not paused.
	execOut(t, a, "web1", "echo four > /data/marker; sync")
	snap(t, a, "web1", "d1", "--no-memory")
	if s := listSnapshots(t, a, "web1")["d1"]; s.IncludesMemory || s.Parent != "s3" {
		t.Fatalf("disk-only snapshot: %+v", s)
	}
	// Reverting to it leaves the VM powered off at that disk state.
	var off api.VM
	json.Unmarshal([]byte(a.mustVigil("snapshot", "revert", "web1", "d1", "-o", "json")), &off)
	if off.State != api.StateStopped || off.PID != 0 {
		t.Fatalf("revert to a disk-only snapshot: %+v", off)
	}
	a.mustVigil("vm", "start", "web1", "--wait")
	if got := execOut(t, a, "web1", "cat /data/marker"); got != "four" {
		t.Fatalf("disk after reverting to d1: %q, want four", got)
	}

	// A stopped VM gets a disk-only snapshot.
	a.mustVigil("vm", "stop", "web1", "--force")
	snap(t, a, "web1", "off1")
	if s := listSnapshots(t, a, "web1")["off1"]; s.IncludesMemory || s.VMState != api.StateStopped {
		t.Fatalf("snapshot of a stopped vm: %+v", s)
	}

	// Bad input.
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"snapshot", "create", "web1", "s2"}, "already has a snapshot"},
		{[]string{"snapshot", "create", "web1", "Bad_Name"}, "invalid snapshot name"},
		{[]string{"snapshot", "revert", "web1", "nope"}, "has no snapshot nope"},
		{[]string{"snapshot", "delete", "web1", "nope"}, "has no snapshot nope"},
		{[]string{"snapshot", "list", "nope"}, "does not exist"},
		{[]string{"vm", "delete", "web1"}, "--force"},
	} {
		if _, errs, code := a.vigil(tt.args...); code == 0 || !strings.Contains(errs, tt.want) {
			t.Fatalf("vigil %v: exit %d, %q; want an error containing %q", tt.args, code, errs, tt.want)
		}
	}

	// Snapshots survive an agent restart, and still revert.
	a.kill()
	a.start()
	if ss = listSnapshots(t, a, "web1"); len(ss) != 4 {
		t.Fatalf("after agent restart: %d snapshots, want 4", len(ss))
	}
	// Reverting a suspended VM discards its saved state.
	a.mustVigil("vm", "start", "web1", "--wait")
	a.mustVigil("vm", "pause", "web1", "--to-disk")
	revertRunning(t, a, "web1", "s2", p2, "two")

	a.mustVigil("vm", "delete", "web1", "--force")
	if _, errs, code := a.vigil("snapshot", "list", "web1"); code == 0 || !strings.Contains(errs, "does not exist") {
		t.Fatalf("snapshots of a deleted vm: %q", errs)
	}
}

// busyLoop keeps the guest writing to its memory (random data into tmpfs)
// and a counter both to memory (/tmp/c) and, synced, to its disk (/data/c),
// until /tmp/stop exists, then says so in /tmp/done (both in memory: a
// revert brings the loop back).
const busyLoop = `i=0; while [ ! -e /tmp/stop ]; do i=$((i+1)); echo $i > /data/c; sync; echo $i > /tmp/c; dd if=/dev/urandom of=/tmp/x bs=64k count=100 2>/dev/null; done; touch /tmp/done`

// TestLiveSnapshotOfBusyGuest takes memory snapshots of a guest that keeps
// writing to its memory and disk. They are taken live (the guest is stopped
// only at the switchover, under TCG too: Vigil's VMs have RAM that QEMU
// 7.2 tracks correctly during a live copy, see qemu.LivePrecopySafe), and
// each revert must give back a guest that runs on (a page missed by the
// copy crashes it within seconds) whose memory and disk agree: the counter
// in tmpfs is the one on disk, or the next (written to disk first).
func TestLiveSnapshotOfBusyGuest(t *testing.T) {
	needIntegration(t)
	a := newDevAgent(t)
	a.mustVigil("vm", "create", "busy", "--start", "--wait")
	a.mustVigil("vm", "exec", "busy", "--background", "--", busyLoop)
	waitFor(t, "the guest's loop to start", 10*time.Second, func() bool {
		n, _ := strconv.Atoi(execOut(t, a, "busy", "cat /tmp/c 2>/dev/null || echo 0"))
		return n > 3
	})
	const snaps = 3
	var points []point
	for i := 1; i <= snaps; i++ {
		time.Sleep(2 * time.Second)
		v := showVM(t, a, "busy")
		points = append(points, point{v.Guest.BootID, v.Guest.Seq})
		var s api.Snapshot
		json.Unmarshal([]byte(a.mustVigil("snapshot", "create", "busy", fmt.Sprintf("b%d", i), "-o", "json")), &s)
		if s.Operation == nil {
			t.Fatalf("snapshot b%d: no operation report: %+v", i, s)
		}
		t.Logf("snapshot b%d: guest paused %.1f ms, %.0f ms in all", i, s.Operation.PausedMS, s.Operation.DurationMS)
		if s.Operation.PausedMS <= 0 || s.Operation.PausedMS > 0.5*s.Operation.DurationMS {
			t.Errorf("snapshot b%d: paused %.1f of %.1f ms: not a live copy", i, s.Operation.PausedMS, s.Operation.DurationMS)
		}
	}
	for i := snaps; i >= 1; i-- {
		name := fmt.Sprintf("b%d", i)
		var v api.VM
		json.Unmarshal([]byte(a.mustVigil("snapshot", "revert", "busy", name, "--wait", "-o", "json")), &v)
		if v.State != api.StateRunning || v.Guest == nil || v.Guest.BootID != points[i-1].boot {
			t.Fatalf("revert to %s: %+v (snapshot taken at boot %s)", name, v, points[i-1].boot)
		}
		// The loop went on from the snapshot: stopped at the end of an
		// iteration, its counter in memory is the one the disk holds, read
		// past the page cache (a disk frozen at another instant than the
		// memory would show another value, or a broken file system).
		pair := strings.Fields(execOut(t, a, "busy", "touch /tmp/stop; while [ ! -e /tmp/done ]; do sleep 0.2; done; sync; echo 3 > /proc/sys/vm/drop_caches; cat /tmp/c /data/c"))
		if len(pair) != 2 || pair[0] != pair[1] {
			t.Fatalf("after revert to %s: counter in memory and on disk: %q", name, pair)
		}
		mem, _ := strconv.Atoi(pair[0])
		if mem <= 0 {
			t.Fatalf("after revert to %s: counter %q", name, pair[0])
		}
		// Runs on: heartbeats for a while, no panic.
		seq := showVM(t, a, "busy").Guest.Seq
		time.Sleep(4 * time.Second)
		after := showVM(t, a, "busy")
		if after.State != api.StateRunning || after.Guest == nil || after.Guest.Seq < seq+2 {
			serial := strings.Split(a.mustVigil("vm", "console", "busy"), "\n")
			t.Fatalf("after revert to %s the guest did not run on: %+v\n%s", name, after, strings.Join(serial[max(0, len(serial)-40):], "\n"))
		}
	}
}
