package integration

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vigil-project/vigil/api"
)

// qemuCopies counts the live QEMU processes on this machine, whichever
// host agent started them, that have VM name's disk open: the copies that
// could write to it. (A QEMU that daemonizes is briefly a parent waiting for
// its child; the parent never opens the disk and is not counted.)
func qemuCopies(name string) int {
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	disk := filepath.Join("vms", name, "disk.qcow2")
	n := 0
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err != nil || !bytes.Contains(b, []byte("guest="+name+",")) || !bytes.Contains(b, []byte("qemu-system")) {
			continue
		}
		dir := filepath.Dir(p)
		var pid int
		fmt.Sscanf(filepath.Base(dir), "%d", &pid)
		if !processAlive(pid) {
			continue
		}
		fds, _ := filepath.Glob(filepath.Join(dir, "fd", "*"))
		for _, fd := range fds {
			if target, err := os.Readlink(fd); err == nil && strings.HasSuffix(target, disk) {
				n++
				break
			}
		}
	}
	return n
}

// sampler watches the process table until stopped and remembers the most
// copies of a VM it ever saw at once.
type sampler struct {
	stop chan struct{}
	wg   sync.WaitGroup
	mu   sync.Mutex
	max  int
	n    int
}

func sampleCopies(name string) *sampler {
	s := &sampler{stop: make(chan struct{})}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c := qemuCopies(name)
			s.mu.Lock()
			s.n++
			s.max = max(s.max, c)
			s.mu.Unlock()
			select {
			case <-s.stop:
				return
			case <-time.After(10 * time.Millisecond):
			}
		}
	}()
	return s
}

func (s *sampler) done() (maxCopies, samples int) {
	close(s.stop)
	s.wg.Wait()
	return s.max, s.n
}

func incidentEvents(inc api.Incident) []string {
	var out []string
	for _, e := range inc.Timeline {
		out = append(out, e.Event)
	}
	return out
}

// TestHostFailover runs a manager and two hosts sharing a storage pool.
// A host killed hard (agent and QEMUs): its VM comes back on the other
// host, with a failover incident and its timeline. A host frozen with
// SIGSTOP past its death: its VM moves, but never runs twice (the process
// table is sampled throughout), and the frozen host, once continued, kills
// its stale copy and rejoins clean.
func TestHostFailover(t *testing.T) {
	needIntegration(t)
	c := startPoolCluster(t, "h1", "h2")
	m, pool, dirs, hosts, startHost := c.m, c.pool, c.dirs, c.hosts, c.startHost
	if hs := hostList(t, m); hs["h1"].StoragePool == "" || hs["h1"].StoragePool != hs["h2"].StoragePool {
		t.Fatalf("hosts do not report the same pool: %+v", hs)
	}

	var v api.VM
	json.Unmarshal([]byte(m.mustVigil("vm", "create", "fo1", "--host", "h1", "--start", "--wait", "-o", "json")), &v)
	if v.Host != "h1" || v.Guest == nil {
		t.Fatalf("vm on h1: %+v", v)
	}
	if _, err := os.Stat(filepath.Join(pool, "vms", "fo1", "disk.qcow2")); err != nil {
		t.Fatalf("the disk is not in the pool: %v", err)
	}

	// 1. kill -9 of h1's agent and its QEMU.
	hosts["h1"].kill()
	killQEMUs(dirs["h1"])
	killed := time.Now()
	waitFor(t, "fo1 serving on h2", 40*time.Second, func() bool {
		v := showVM(t, m, "fo1")
		return v.Host == "h2" && v.Guest != nil && v.Guest.BootID != "" && v.State == api.StateRunning
	})
	t.Logf("host killed -> vm back on h2 with a guest heartbeat: %s", time.Since(killed).Round(100*time.Millisecond))
	moved := showVM(t, m, "fo1")
	if page := httpGet(t, "http://"+moved.Endpoint+"/"); !strings.Contains(page, moved.Guest.BootID) {
		t.Fatalf("endpoint after failover:\n%s", page)
	}
	if hostList(t, m)["h1"].State != "dead" {
		t.Fatalf("h1 not shown dead: %+v", hostList(t, m)["h1"])
	}
	var inc api.Incident
	waitFor(t, "failover incident with guest back", 10*time.Second, func() bool {
		incs := incidents(t, m, "fo1")
		if len(incs) == 0 {
			return false
		}
		inc = incs[len(incs)-1]
		return inc.RecoveredAt != nil
	})
	want := []string{"last heartbeat", "fenced", "declared dead", "moved", "restarted", "guest back"}
	if inc.Kind != "host-failure" || strings.Join(incidentEvents(inc), ",") != strings.Join(want, ",") {
		t.Fatalf("incident %s, timeline %v; want host-failure with %v", inc.Kind, incidentEvents(inc), want)
	}

	// h1 comes back: it learns it was declared dead, drops fo1 (h2 owns it
	// now) and rejoins with no VMs.
	startHost("h1", "")
	waitFor(t, "h1 back, clean", 30*time.Second, func() bool {
		h := hostList(t, m)["h1"]
		return h.State == "up" && h.VMs == 0
	})

	// 2. Partition: freeze h2's agent past its death. Its QEMU keeps running.
	s := sampleCopies("fo1")
	before := showVM(t, m, "fo1")
	hosts["h2"].cmd.Process.Signal(syscall.SIGSTOP)
	waitFor(t, "h2 declared dead", 30*time.Second, func() bool { return hostList(t, m)["h2"].State == "dead" })
	waitFor(t, "fo1 moved to h1 and waiting for the disk", 10*time.Second, func() bool {
		v := showVM(t, m, "fo1")
		return v.Host == "h1" && strings.Contains(v.Message, "in use")
	})
	time.Sleep(2 * time.Second) // the new host keeps being refused while the old copy lives
	if qemuCopies("fo1") != 1 {
		t.Fatalf("%d copies of fo1 while h2 is frozen", qemuCopies("fo1"))
	}
	hosts["h2"].cmd.Process.Signal(syscall.SIGCONT)
	waitFor(t, "fo1 serving on h1", 40*time.Second, func() bool {
		v := showVM(t, m, "fo1")
		return v.Host == "h1" && v.Guest != nil && v.Guest.BootID != before.Guest.BootID && v.State == api.StateRunning
	})
	waitFor(t, "h2 back, clean", 30*time.Second, func() bool {
		h := hostList(t, m)["h2"]
		return h.State == "up" && h.VMs == 0
	})
	maxCopies, samples := s.done()
	t.Logf("process table sampled %d times during the partition; at most %d copies of fo1", samples, maxCopies)
	if maxCopies != 1 || samples < 100 {
		t.Fatalf("at most %d copies in %d samples: a vm ran twice (or was not sampled)", maxCopies, samples)
	}
	// The partition's incident shows the new host's refused start and the
	// moment the old host killed its copy.
	waitFor(t, "the old copy's end on the timeline", 10*time.Second, func() bool {
		incs := incidents(t, m, "fo1")
		steps := strings.Join(incidentEvents(incs[len(incs)-1]), ",")
		return strings.Contains(steps, "start refused") && strings.Contains(steps, "old copy killed")
	})
	if last := incidents(t, m, "fo1"); last[len(last)-1].Host != "h2" {
		t.Fatalf("the partition's incident names host %q, want h2", last[len(last)-1].Host)
	}
	m.mustVigil("vm", "delete", "fo1")
	if _, err := os.Stat(filepath.Join(pool, "vms", "fo1")); !os.IsNotExist(err) {
		t.Fatalf("fo1's files are still in the pool after delete: %v", err)
	}
}
