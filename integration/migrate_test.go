package integration

import (
	"encoding/json"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vigil-project/vigil/api"
)

// poolCluster is a manager and host agents sharing one storage pool, each
// its own vigil process.
type poolCluster struct {
	t     *testing.T
	m     *devAgent
	pool  string
	dirs  map[string]string // host name → its data dir
	hosts map[string]*proc
}

// startPoolCluster starts a manager and the named hosts and waits until
// every host is up.
func startPoolCluster(t *testing.T, names ...string) *poolCluster {
	t.Helper()
	m := &devAgent{t: t, dataDir: shortTempDir(t), addr: freeAddr(t)}
	startProc(t, "agent", "--manager", "--listen", m.addr, "--data-dir", m.dataDir)
	waitFor(t, "manager", 60*time.Second, func() bool {
		_, _, code := m.vigil("host", "list")
		return code == 0
	})
	c := &poolCluster{t: t, m: m, pool: shortTempDir(t), dirs: map[string]string{}, hosts: map[string]*proc{}}
	for _, name := range names {
		c.dirs[name] = shortTempDir(t)
		t.Cleanup(func() { killQEMUs(c.dirs[name]) })
		c.startHost(name, strings.TrimSpace(m.mustVigil("host", "join-token", "-q")))
	}
	waitFor(t, "hosts up", 30*time.Second, func() bool {
		hs := hostList(t, m)
		for _, name := range names {
			if hs[name].State != "up" {
				return false
			}
		}
		return true
	})
	return c
}

// startHost (re)starts a host agent; a restarted one needs no token.
func (c *poolCluster) startHost(name, token string) {
	c.hosts[name] = startProc(c.t, "agent", "--host", "--name", name, "--manager", "https://"+c.m.addr, "--join-token", token,
		"--data-dir", c.dirs[name], "--image-dir", imageDir, "--storage-pool", c.pool)
}

// TestLiveMigrationAndDrain moves a running guest between two hosts and
// checks it never rebooted (same boot_id, heartbeat seq only grows) and
// still serves; then drains a host: the running VM goes live, a stopped
// one is handed over, and the scheduler keeps new VMs off it until enabled.
func TestLiveMigrationAndDrain(t *testing.T) {
	needIntegration(t)
	m := startPoolCluster(t, "h1", "h2").m
	var v api.VM
	json.Unmarshal([]byte(m.mustVigil("vm", "create", "mig1", "--host", "h1", "--start", "--wait", "-o", "json")), &v)
	if v.Guest == nil {
		t.Fatalf("no guest: %+v", v)
	}

	// Watch the guest's heartbeats through the API during the migration.
	var mu sync.Mutex
	var seen []api.GuestInfo
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		c := m.client()
		for {
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			if vm, err := c.VM(t.Context(), "mig1"); err == nil && vm.Guest != nil {
				mu.Lock()
				seen = append(seen, *vm.Guest)
				mu.Unlock()
			}
		}
	}()
	time.Sleep(1500 * time.Millisecond)
	var moved api.VM
	json.Unmarshal([]byte(m.mustVigil("vm", "migrate", "mig1", "--to", "h2", "-o", "json")), &moved)
	waitFor(t, "heartbeats from h2", 15*time.Second, func() bool {
		vm := showVM(t, m, "mig1")
		return vm.Host == "h2" && vm.Guest != nil && vm.Guest.Seq > v.Guest.Seq+3
	})
	time.Sleep(1500 * time.Millisecond)
	close(stop)
	wg.Wait()

	if moved.Host != "h2" || moved.State != api.StateRunning || moved.LastOperation == nil || moved.LastOperation.Action != "migrate" {
		t.Fatalf("after migrate: %+v", moved)
	}
	t.Logf("live migration: total %.0f ms, downtime %.0f ms", moved.LastOperation.DurationMS, moved.LastOperation.PausedMS)
	for i, g := range seen {
		if g.BootID != v.Guest.BootID {
			t.Fatalf("sample %d: boot_id %s, want %s: the guest rebooted", i, g.BootID, v.Guest.BootID)
		}
		if i > 0 && g.Seq < seen[i-1].Seq {
			t.Fatalf("sample %d: seq went back from %d to %d", i, seen[i-1].Seq, g.Seq)
		}
	}
	if len(seen) < 20 {
		t.Fatalf("only %d heartbeat samples", len(seen))
	}
	after := showVM(t, m, "mig1")
	if page := httpGet(t, "http://"+after.Endpoint+"/"); !strings.Contains(page, v.Guest.BootID) {
		t.Fatalf("endpoint after migration:\n%s", page)
	}
	if n := qemuCopies("mig1"); n != 1 {
		t.Fatalf("%d qemu copies of mig1 after migration", n)
	}
	waitFor(t, "h1 drops its old entry", 10*time.Second, func() bool { return hostList(t, m)["h1"].VMs == 0 })

	// Drain h2: mig1 (running) goes live, mig2 (stopped) is handed over.
	m.mustVigil("vm", "create", "mig2", "--host", "h2")
	out := m.mustVigil("host", "drain", "h2")
	if !strings.Contains(out, "mig1 -> h1: migrated live") || !strings.Contains(out, "mig2 -> h1: moved") {
		t.Fatalf("drain output:\n%s", out)
	}
	waitFor(t, "mig1 heartbeats on h1", 10*time.Second, func() bool { return showVM(t, m, "mig1").Guest != nil })
	if vm := showVM(t, m, "mig1"); vm.Host != "h1" || vm.State != api.StateRunning || vm.Guest.BootID != v.Guest.BootID {
		t.Fatalf("mig1 after drain: %+v", vm)
	}
	if h := hostList(t, m)["h2"]; !h.Drained {
		t.Fatalf("h2 not drained: %+v", h)
	}
	if _, errs, code := m.vigil("vm", "create", "mig3", "--host", "h2"); code == 0 || !strings.Contains(errs, "h2 is drained") {
		t.Fatalf("create on a drained host: exit %d %q", code, errs)
	}
	var v3 api.VM
	json.Unmarshal([]byte(m.mustVigil("vm", "create", "mig3", "-o", "json")), &v3)
	if v3.Host != "h1" {
		t.Fatalf("scheduler placed mig3 on drained %s", v3.Host)
	}
	// mig2, handed over stopped, starts on its new host.
	if vm := showVM(t, m, "mig2"); vm.Host != "h1" {
		t.Fatalf("mig2 after drain: %+v", vm)
	}
	m.mustVigil("vm", "start", "mig2")
	m.mustVigil("host", "enable", "h2")
	if h := hostList(t, m)["h2"]; h.Drained {
		t.Fatalf("h2 still drained after enable: %+v", h)
	}
	m.mustVigil("vm", "migrate", "mig2", "--to", "h2")
	if vm := showVM(t, m, "mig2"); vm.Host != "h2" || vm.State != api.StateRunning {
		t.Fatalf("mig2 after migrating back to an enabled host: %+v", vm)
	}
	for _, name := range []string{"mig1", "mig2", "mig3"} {
		m.mustVigil("vm", "delete", name)
	}
}
