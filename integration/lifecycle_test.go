package integration

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/testenv"
)

func showVM(t *testing.T, a *devAgent, name string) api.VM {
	t.Helper()
	var vm api.VM
	if err := json.Unmarshal([]byte(a.mustVigil("vm", "show", name, "-o", "json")), &vm); err != nil {
		t.Fatalf("vm show -o json: %v", err)
	}
	return vm
}

// TestVMLifecycle walks one VM through create, run, stop, start and delete
// with the CLI, checking the real QEMU process and the real guest each time.
func TestVMLifecycle(t *testing.T) {
	needIntegration(t)
	a := newDevAgent(t)

	var vm api.VM
	out := a.mustVigil("vm", "create", "web1", "--memory", "128M", "--cpus", "1", "--disk", "256M", "--start", "--wait", "-o", "json")
	if err := json.Unmarshal([]byte(out), &vm); err != nil {
		t.Fatalf("create output: %v\n%s", err, out)
	}
	if vm.Name != "web1" || vm.State != api.StateRunning || vm.Host == "" || vm.PID <= 0 ||
		vm.MemoryBytes != 128<<20 || vm.CPUs != 1 || vm.Endpoint == "" {
		t.Fatalf("created vm = %+v", vm)
	}
	if vm.Guest == nil || vm.Guest.BootID == "" || vm.Guest.Seq < 1 || vm.Guest.LastHeartbeat.IsZero() {
		t.Fatalf("--wait returned before a heartbeat: %+v", vm.Guest)
	}
	if !processAlive(vm.PID) {
		t.Fatalf("qemu pid %d is not running", vm.PID)
	}
	// The JSON carries the documented field names.
	var raw map[string]any
	json.Unmarshal([]byte(out), &raw)
	for _, k := range []string{"name", "state", "host", "pid", "memory_bytes", "cpus", "endpoint", "guest"} {
		if _, ok := raw[k]; !ok {
			t.Fatalf("vm json lacks %q: %s", k, out)
		}
	}
	for _, k := range []string{"boot_id", "seq", "uptime_seconds", "last_heartbeat"} {
		if _, ok := raw["guest"].(map[string]any)[k]; !ok {
			t.Fatalf("guest json lacks %q: %s", k, out)
		}
	}
	bootID := vm.Guest.BootID

	// Heartbeats keep flowing, counting up.
	waitFor(t, "heartbeat seq to advance", 10*time.Second, func() bool {
		return showVM(t, a, "web1").Guest.Seq >= vm.Guest.Seq+2
	})
	// The endpoint reaches the guest's web server, which shows this boot.
	if page := httpGet(t, "http://"+vm.Endpoint+"/"); !strings.Contains(page, bootID) {
		t.Fatalf("guest page does not show boot id %s:\n%s", bootID, page)
	}
	// Table output lists it.
	if list := a.mustVigil("vm", "list"); !strings.Contains(list, "web1") || !strings.Contains(list, "running") {
		t.Fatalf("vm list:\n%s", list)
	}

	// Graceful stop: ACPI power-down, QEMU exits, state stopped.
	a.mustVigil("vm", "stop", "web1", "--timeout", "30s")
	stopped := showVM(t, a, "web1")
	if stopped.State != api.StateStopped || stopped.PID != 0 || stopped.Guest != nil {
		t.Fatalf("after stop: %+v", stopped)
	}
	waitFor(t, "qemu to exit", 5*time.Second, func() bool { return !processAlive(vm.PID) })
	if console := a.mustVigil("vm", "console", "web1"); !strings.Contains(console, "reboot: Power down") {
		t.Fatalf("console of a gracefully stopped guest lacks the power-down:\n%s", console)
	}

	// Start again: a new boot of the same disk.
	var again api.VM
	json.Unmarshal([]byte(a.mustVigil("vm", "start", "web1", "--wait", "-o", "json")), &again)
	if again.State != api.StateRunning || again.Guest == nil || again.Guest.BootID == bootID || again.PID == vm.PID {
		t.Fatalf("after start: %+v (old boot %s, old pid %d)", again, bootID, vm.PID)
	}
	if console := a.mustVigil("vm", "console", "web1"); !strings.Contains(console, "mounted existing filesystem") {
		t.Fatalf("second boot did not find the filesystem made by the first:\n%s", console)
	}

	// Restart: a fresh boot again.
	var restarted api.VM
	json.Unmarshal([]byte(a.mustVigil("vm", "restart", "web1", "--force", "--wait", "-o", "json")), &restarted)
	if restarted.Guest == nil || restarted.Guest.BootID == again.Guest.BootID {
		t.Fatalf("restart did not reboot the guest: %+v", restarted.Guest)
	}

	// Events recorded the lifecycle.
	events := a.mustVigil("events")
	for _, want := range []string{"vm.created", "vm.started", "vm.guest-ready", "vm.exited", "state=stopped"} {
		if !strings.Contains(events, want) {
			t.Fatalf("events lack %q:\n%s", want, events)
		}
	}

	// Delete stops it and removes its files.
	dir := filepath.Join(a.dataDir, "host", "vms", "web1")
	if _, err := os.Stat(filepath.Join(dir, "disk.qcow2")); err != nil {
		t.Fatalf("disk missing before delete: %v", err)
	}
	a.mustVigil("vm", "delete", "web1")
	waitFor(t, "qemu to exit after delete", 5*time.Second, func() bool { return !processAlive(restarted.PID) })
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("vm directory still there after delete: %v", err)
	}
	if _, errs, code := a.vigil("vm", "show", "web1"); code == 0 || !strings.Contains(errs, "does not exist") {
		t.Fatalf("show after delete: exit %d, %q", code, errs)
	}
}

func httpGet(t *testing.T, url string) string {
	t.Helper()
	return testenv.HTTPGet(t.Context(), t, url)
}
