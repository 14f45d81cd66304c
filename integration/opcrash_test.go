package integration

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vigil-project/vigil/api"
)

// crashSteps are the points at which the managers of TestLeaderDiesMidOperation
// kill themselves (VIGIL_CRASH_AT): right after the live migration's
// transfer (the guest runs on the destination, the record still says the
// source), right after a suspend's state was saved (no QEMU, the record
// says running), right after a snapshot was taken on the host (its record
// not yet complete).
const crashSteps = "migrate/transfer,suspend/saved,snapshot/take"

// managerTrio is three managers over an embedded three-member etcd; any
// of them can be killed and started again.
type managerTrio struct {
	t     *testing.T
	addrs []string
	dirs  []string
	args  [][]string
	procs []*proc
}

func startManagerTrio(t *testing.T) *managerTrio {
	t.Helper()
	tr := &managerTrio{t: t}
	var peers []string
	for i := 1; i <= 3; i++ {
		tr.addrs = append(tr.addrs, freeAddr(t))
		peers = append(peers, fmt.Sprintf("m%d=http://%s", i, freeAddr(t)))
	}
	for i := 1; i <= 3; i++ {
		tr.dirs = append(tr.dirs, shortTempDir(t))
		tr.args = append(tr.args, []string{"agent", "--manager", "--name", fmt.Sprintf("m%d", i), "--etcd-peers", strings.Join(peers, ","),
			"--listen", tr.addrs[i-1], "--data-dir", tr.dirs[i-1], "--log-level", "debug"})
		tr.procs = append(tr.procs, nil)
		tr.start(i - 1)
	}
	tr.leader()
	return tr
}

func (tr *managerTrio) start(i int) {
	p := &proc{log: &bytes.Buffer{}}
	p.cmd = exec.Command(filepath.Join(binDir, "vigil"), tr.args[i]...)
	p.cmd.Env = append(os.Environ(), "VIGIL_CRASH_AT="+crashSteps)
	p.cmd.Stdout, p.cmd.Stderr = p.log, p.log
	if err := p.cmd.Start(); err != nil {
		tr.t.Fatal(err)
	}
	tr.t.Cleanup(func() {
		p.kill()
		if tr.t.Failed() {
			tr.t.Logf("log of manager %d:\n%s", i+1, p.log)
		}
	})
	tr.procs[i] = p
}

// leader waits for a leading manager and returns its index.
func (tr *managerTrio) leader() int {
	tr.t.Helper()
	lead := -1
	waitFor(tr.t, "a leading manager", 60*time.Second, func() bool {
		for i, a := range tr.addrs {
			if tr.procs[i].cmd.ProcessState == nil && isLeader(a) {
				lead = i
				return true
			}
		}
		return false
	})
	return lead
}

// client is a CLI against manager i.
func (tr *managerTrio) client(i int) *devAgent {
	return &devAgent{t: tr.t, addr: tr.addrs[i], dataDir: tr.dirs[i]}
}

// survivor is a live manager other than i.
func (tr *managerTrio) survivor(i int) *devAgent {
	for j := range tr.addrs {
		if j != i && tr.procs[j].cmd.ProcessState == nil {
			return tr.client(j)
		}
	}
	tr.t.Fatal("no manager left")
	return nil
}

// waitDead waits for manager i to have killed itself.
func (tr *managerTrio) waitDead(i int) {
	tr.t.Helper()
	done := make(chan struct{})
	go func() { tr.procs[i].cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(2 * time.Minute):
		tr.t.Fatalf("manager %d did not crash at its step; log:\n%s", i+1, tr.procs[i].log)
	}
	if !strings.Contains(tr.procs[i].log.String(), "VIGIL_CRASH_AT reached") {
		tr.t.Fatalf("manager %d ended, but not at its crash step:\n%s", i+1, tr.procs[i].log)
	}
}

// TestLeaderDiesMidOperation kills the leading manager in the middle of a
// live migration, a suspend and a snapshot (each at a step where the hosts
// have acted and the record has not caught up). Each time the next leader
// settles the VM from what the hosts report: the migration is completed on
// the destination, the suspend is recorded, the half-recorded snapshot is
// rolled back. The guest never reboots and never runs twice.
func TestLeaderDiesMidOperation(t *testing.T) {
	needIntegration(t)
	tr := startManagerTrio(t)
	var urls []string
	for _, a := range tr.addrs {
		urls = append(urls, "https://"+a)
	}
	m := tr.client(tr.leader())
	pool := shortTempDir(t)
	for _, h := range []string{"h1", "h2"} {
		dir := shortTempDir(t)
		t.Cleanup(func() { killQEMUs(dir) })
		tok := strings.TrimSpace(m.mustVigil("host", "join-token", "-q"))
		startProc(t, "agent", "--host", "--name", h, "--manager", strings.Join(urls, ","), "--join-token", tok,
			"--data-dir", dir, "--image-dir", imageDir, "--storage-pool", pool)
	}
	waitFor(t, "hosts up", 60*time.Second, func() bool {
		hs := hostList(t, m)
		return hs["h1"].State == "up" && hs["h2"].State == "up"
	})
	var vm api.VM
	json.Unmarshal([]byte(m.mustVigil("vm", "create", "oc", "--host", "h1", "--start", "--wait", "-o", "json")), &vm)
	if vm.Guest == nil {
		t.Fatalf("no guest: %+v", vm)
	}
	boot := vm.Guest.BootID

	// settled waits until a surviving manager shows the VM in state want,
	// no operation pending (a new operation is accepted).
	settled := func(dead int, want api.VMState, cond func(api.VM) bool) api.VM {
		t.Helper()
		s := tr.survivor(dead)
		var v api.VM
		waitFor(t, fmt.Sprintf("vm settled in %s", want), 90*time.Second, func() bool {
			out, _, code := s.vigil("vm", "show", "oc", "-o", "json")
			if code != 0 || json.Unmarshal([]byte(out), &v) != nil {
				return false
			}
			if v.State != want || !cond(v) {
				return false
			}
			// Settled means no operation is left pending: a policy change
			// (harmless) is accepted, not refused as busy.
			_, _, code = s.vigil("vm", "set", "oc", "--hang-timeout", "10s")
			return code == 0
		})
		return v
	}
	restart := func(i int) {
		t.Helper()
		tr.start(i)
		waitFor(t, "the killed manager back", 60*time.Second, func() bool {
			_, _, code := tr.client(i).vigil("host", "list")
			return code == 0
		})
	}

	t.Run("migration", func(t *testing.T) {
		lead := tr.leader()
		tr.client(lead).vigil("vm", "migrate", "oc", "--to", "h2") // dies in the middle
		tr.waitDead(lead)
		defer restart(lead)
		// The guest's first heartbeat on h2 follows the settle by a moment.
		v := settled(lead, api.StateRunning, func(v api.VM) bool { return v.Host == "h2" && v.Guest != nil })
		if v.Guest == nil || v.Guest.BootID != boot {
			t.Fatalf("after the settled migration: %+v; want the same boot %s", v.Guest, boot)
		}
		if n := qemuCopies("oc"); n != 1 {
			t.Fatalf("%d qemu copies of the vm, want 1", n)
		}
	})

	t.Run("suspend", func(t *testing.T) {
		lead := tr.leader()
		tr.client(lead).vigil("vm", "pause", "oc", "--to-disk")
		tr.waitDead(lead)
		defer restart(lead)
		settled(lead, api.StateSuspended, func(api.VM) bool { return true })
		if n := qemuCopies("oc"); n != 0 {
			t.Fatalf("%d qemu copies of a suspended vm", n)
		}
		s := tr.survivor(lead)
		s.mustVigil("vm", "resume", "oc")
		var v api.VM
		waitFor(t, "the resumed guest's heartbeat", 60*time.Second, func() bool {
			json.Unmarshal([]byte(s.mustVigil("vm", "show", "oc", "-o", "json")), &v)
			return v.State == api.StateRunning && v.Guest != nil
		})
		if v.Guest.BootID != boot {
			t.Fatalf("resumed guest has boot %s, want %s (the same boot)", v.Guest.BootID, boot)
		}
	})

	t.Run("snapshot", func(t *testing.T) {
		lead := tr.leader()
		tr.client(lead).vigil("snapshot", "create", "oc", "s1")
		tr.waitDead(lead)
		defer restart(lead)
		s := tr.survivor(lead)
		waitFor(t, "the half-made snapshot rolled back", 90*time.Second, func() bool {
			out, _, code := s.vigil("snapshot", "list", "oc", "-o", "json")
			var l []api.Snapshot
			return code == 0 && json.Unmarshal([]byte(out), &l) == nil && len(l) == 0
		})
		v := settled(lead, api.StateRunning, func(v api.VM) bool { return v.Guest != nil })
		if v.Guest.BootID != boot || qemuCopies("oc") != 1 {
			t.Fatalf("after the rollback: %+v (copies %d)", v, qemuCopies("oc"))
		}
		// The host's half of it is gone too: no internal snapshot s1 in the
		// disk image (qemu-img -U reads it while QEMU runs).
		out, err := exec.Command("qemu-img", "snapshot", "-U", "-l", filepath.Join(pool, "vms", "oc", "disk.qcow2")).CombinedOutput()
		if err != nil || strings.Contains(string(out), "s1") {
			t.Fatalf("disk image after the rollback (%v):\n%s", err, out)
		}
	})
	tr.client(tr.leader()).mustVigil("vm", "delete", "oc", "--force")
}
