package integration

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vigil-project/vigil/api"
)

// writerLoop appends consecutive numbers to /data/log in the guest, so any
// gap or damage after a save and restore shows.
const writerLoop = `i=$(wc -l < /data/log 2>/dev/null || echo 0); while true; do i=$((i+1)); echo $i >> /data/log; sleep 0.02; done`

// checkLog reads /data/log in the guest and fails unless it is 1..N with no
// gap or damaged line; it returns N.
func checkLog(t *testing.T, a *devAgent, vm string) int {
	t.Helper()
	out := strings.TrimSpace(a.mustVigil("vm", "exec", vm, "--", "cat /data/log 2>/dev/null; true"))
	if out == "" {
		return 0 // the writer has created the file but not written to it yet
	}
	lines := strings.Split(out, "\n")
	for i, l := range lines {
		if n, err := strconv.Atoi(l); err != nil || n != i+1 {
			t.Fatalf("/data/log line %d is %q, want %d (gap or corruption)", i+1, l, i+1)
		}
	}
	return len(lines)
}

func execOut(t *testing.T, a *devAgent, vm, cmd string) string {
	t.Helper()
	return strings.TrimSpace(a.mustVigil("vm", "exec", vm, "--", cmd))
}

// TestPauseSuspendResume: pause in memory, then to disk while the guest
// writes to /data, across an agent restart; the guest continues where it was.
func TestPauseSuspendResume(t *testing.T) {
	needIntegration(t)
	a := newDevAgent(t)
	a.mustVigil("vm", "create", "web1", "--start", "--wait")
	a.mustVigil("vm", "exec", "web1", "--background", "--", writerLoop)
	waitFor(t, "the guest writer to start", 10*time.Second, func() bool { return checkLog(t, a, "web1") > 10 })

	// In memory: CPUs stop, heartbeats stop, nothing is lost.
	a.mustVigil("vm", "pause", "web1")
	paused := showVM(t, a, "web1")
	if paused.State != api.StatePaused || paused.Guest == nil {
		t.Fatalf("after pause: %+v", paused)
	}
	time.Sleep(2500 * time.Millisecond)
	if still := showVM(t, a, "web1"); still.Guest.Seq != paused.Guest.Seq {
		t.Fatalf("heartbeats went on while paused: seq %d -> %d", paused.Guest.Seq, still.Guest.Seq)
	}
	a.mustVigil("vm", "resume", "web1")
	waitFor(t, "heartbeats after resume", 10*time.Second, func() bool {
		v := showVM(t, a, "web1")
		return v.State == api.StateRunning && v.Guest.Seq > paused.Guest.Seq && v.Guest.BootID == paused.Guest.BootID
	})

	// To disk: the QEMU process ends, the state file holds everything.
	before := showVM(t, a, "web1")
	var susp api.VM
	json.Unmarshal([]byte(a.mustVigil("vm", "pause", "web1", "--to-disk", "-o", "json")), &susp)
	if susp.State != api.StateSuspended || susp.PID != 0 {
		t.Fatalf("after pause --to-disk: %+v", susp)
	}
	waitFor(t, "qemu to end after suspend", 5*time.Second, func() bool { return !processAlive(before.PID) })
	stateFile := filepath.Join(a.dataDir, "host", "vms", "web1", "state.vigil")
	if fi, err := os.Stat(stateFile); err != nil || fi.Size() < 16<<20 {
		t.Fatalf("state file: %v", err)
	}

	// It stays suspended across a hard restart of the agent.
	a.kill()
	a.start()
	if v := showVM(t, a, "web1"); v.State != api.StateSuspended {
		t.Fatalf("after agent restart the vm is %s, want suspended", v.State)
	}

	var resumed api.VM
	json.Unmarshal([]byte(a.mustVigil("vm", "resume", "web1", "--wait", "-o", "json")), &resumed)
	if resumed.State != api.StateRunning || resumed.Guest == nil || resumed.Guest.BootID != before.Guest.BootID {
		t.Fatalf("resume from disk: %+v (want boot %s)", resumed, before.Guest.BootID)
	}
	if resumed.Guest.Seq <= before.Guest.Seq || resumed.Guest.Seq > before.Guest.Seq+4 {
		t.Fatalf("heartbeat seq after resume %d; it was %d before: want a continuation", resumed.Guest.Seq, before.Guest.Seq)
	}
	if _, err := os.Stat(stateFile); !os.IsNotExist(err) {
		t.Fatalf("state file kept after a successful resume: %v", err)
	}
	n1 := checkLog(t, a, "web1")
	waitFor(t, "the writer to go on after resume", 10*time.Second, func() bool { return checkLog(t, a, "web1") > n1+10 })
}

// TestBadStateFileKeepsVMSuspended corrupts and truncates a state file: the
// resume fails with a clear error, the VM and the file are left as they were,
// and the intact file still resumes; --discard-state cold-boots.
func TestBadStateFileKeepsVMSuspended(t *testing.T) {
	needIntegration(t)
	a := newDevAgent(t)
	var vm api.VM
	json.Unmarshal([]byte(a.mustVigil("vm", "create", "web1", "--start", "--wait", "-o", "json")), &vm)
	a.mustVigil("vm", "pause", "web1", "--to-disk")
	stateFile := filepath.Join(a.dataDir, "host", "vms", "web1", "state.vigil")
	good, err := os.ReadFile(stateFile)
	if err != nil {
		t.Fatal(err)
	}

	flipped := append([]byte(nil), good...)
	for _, off := range []int{len(good) / 3, len(good) / 2} {
		flipped[off] ^= 0xff
	}
	tests := []struct {
		name    string
		content []byte
		want    string
	}{
		{"flipped bytes", flipped, "corrupt"},
		{"truncated", good[:len(good)/2], "truncated"},
		{"empty", nil, "truncated"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := os.WriteFile(stateFile, tt.content, 0o600); err != nil {
				t.Fatal(err)
			}
			_, errs, code := a.vigil("vm", "resume", "web1")
			if code == 0 {
				t.Fatal("resume of a bad state file succeeded")
			}
			for _, want := range []string{tt.want, stateFile, "--discard-state", "stays suspended"} {
				if !strings.Contains(errs, want) {
					t.Fatalf("error %q lacks %q", errs, want)
				}
			}
			if v := showVM(t, a, "web1"); v.State != api.StateSuspended || v.PID != 0 {
				t.Fatalf("after a failed resume the vm is %s (pid %d), want suspended", v.State, v.PID)
			}
			if b, err := os.ReadFile(stateFile); err != nil || len(b) != len(tt.content) {
				t.Fatalf("the bad state file was changed or removed: %v", err)
			}
		})
	}

	// The intact file still works.
	os.WriteFile(stateFile, good, 0o600)
	var resumed api.VM
	json.Unmarshal([]byte(a.mustVigil("vm", "resume", "web1", "--wait", "-o", "json")), &resumed)
	if resumed.Guest == nil || resumed.Guest.BootID != vm.Guest.BootID {
		t.Fatalf("resume of the restored file: %+v", resumed)
	}

	// --discard-state cold-boots from the disk.
	a.mustVigil("vm", "pause", "web1", "--to-disk")
	var cold api.VM
	json.Unmarshal([]byte(a.mustVigil("vm", "resume", "web1", "--discard-state", "--wait", "-o", "json")), &cold)
	if cold.Guest == nil || cold.Guest.BootID == vm.Guest.BootID {
		t.Fatalf("--discard-state did not cold-boot: %+v", cold.Guest)
	}
	if _, err := os.Stat(stateFile); !os.IsNotExist(err) {
		t.Fatalf("--discard-state left the state file: %v", err)
	}
}

// TestFailedSuspendLeavesVMRunning fills the filesystem that holds the VM
// (a small tmpfs): the save fails, the partial file is removed, and the guest
// runs on as it was.
func TestFailedSuspendLeavesVMRunning(t *testing.T) {
	needIntegration(t)
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount a small tmpfs")
	}
	a := &devAgent{t: t, dataDir: shortTempDir(t), addr: freeAddr(t)}
	vms := filepath.Join(a.dataDir, "host", "vms")
	os.MkdirAll(vms, 0o755)
	if err := syscall.Mount("tmpfs", vms, "tmpfs", 0, "size=48m"); err != nil {
		t.Fatalf("mount tmpfs: %v", err)
	}
	t.Cleanup(func() { syscall.Unmount(vms, syscall.MNT_DETACH) })
	a.start()
	t.Cleanup(func() {
		a.kill()
		killQEMUs(a.dataDir)
	})

	a.mustVigil("vm", "create", "web1", "--start", "--wait")
	before := showVM(t, a, "web1")
	_, errs, code := a.vigil("vm", "pause", "web1", "--to-disk")
	if code == 0 {
		t.Fatal("suspend into a full filesystem succeeded")
	}
	if !strings.Contains(errs, "no space left") || !strings.Contains(errs, "keeps running") {
		t.Fatalf("unclear error: %q", errs)
	}
	after := showVM(t, a, "web1")
	if after.State != api.StateRunning || after.PID != before.PID {
		t.Fatalf("after a failed suspend: %+v", after)
	}
	waitFor(t, "heartbeats after the failed suspend", 10*time.Second, func() bool {
		v := showVM(t, a, "web1")
		return v.Guest != nil && v.Guest.Seq > before.Guest.Seq+1 && v.Guest.BootID == before.Guest.BootID
	})
	ents, _ := os.ReadDir(filepath.Join(vms, "web1"))
	for _, e := range ents {
		if strings.Contains(e.Name(), "state") {
			t.Fatalf("partial state file left: %s", e.Name())
		}
	}
}
