package integration

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/vigil-project/vigil/api"
)

// TestAgentRestartReadopts kills the agent with SIGKILL while a guest runs,
// starts it again on the same data dir, and checks that it adopted the same
// QEMU process without a reboot of the guest, and kept a stopped VM stopped.
func TestAgentRestartReadopts(t *testing.T) {
	needIntegration(t)
	a := newDevAgent(t)
	var vm api.VM
	json.Unmarshal([]byte(a.mustVigil("vm", "create", "web1", "--start", "--wait", "-o", "json")), &vm)
	if vm.Guest == nil {
		t.Fatalf("no guest after create --wait: %+v", vm)
	}
	a.mustVigil("vm", "create", "idle1")

	a.kill()
	if !processAlive(vm.PID) {
		t.Fatalf("qemu (pid %d) died with the agent", vm.PID)
	}
	time.Sleep(1500 * time.Millisecond) // the guest keeps running unsupervised
	a.start()

	var after api.VM
	waitFor(t, "guest heartbeats after re-adoption", 15*time.Second, func() bool {
		after = showVM(t, a, "web1")
		return after.Guest != nil && after.Guest.Seq > vm.Guest.Seq
	})
	if after.State != api.StateRunning || after.PID != vm.PID || after.Guest.BootID != vm.Guest.BootID {
		t.Fatalf("after agent restart: state %s pid %d boot %s; want running, pid %d, boot %s",
			after.State, after.PID, after.Guest.BootID, vm.PID, vm.Guest.BootID)
	}
	if idle := showVM(t, a, "idle1"); idle.State != api.StateStopped {
		t.Fatalf("stopped vm came back as %s", idle.State)
	}
	// The adopted VM is fully under control again.
	a.mustVigil("vm", "stop", "web1", "--force")
	waitFor(t, "adopted qemu to exit", 5*time.Second, func() bool { return !processAlive(vm.PID) })
}
