package integration

import (
	"encoding/json"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vigil-project/vigil/api"
)

func incidents(t *testing.T, a *devAgent, vm string) []api.Incident {
	t.Helper()
	var incs []api.Incident
	out := a.mustVigil("vm", "incidents", vm, "-o", "json")
	if err := json.Unmarshal([]byte(out), &incs); err != nil {
		t.Fatalf("incidents -o json: %v\n%s", err, out)
	}
	return incs
}

// waitUptime waits until the guest has been up for d (past the grace period).
func waitUptime(t *testing.T, a *devAgent, vm string, d time.Duration) api.VM {
	t.Helper()
	var v api.VM
	waitFor(t, "guest uptime "+d.String(), 60*time.Second, func() bool {
		v = showVM(t, a, vm)
		return v.Guest != nil && v.Guest.UptimeSeconds >= d.Seconds()
	})
	return v
}

// TestCrashRecovery injects each kind of crash and checks it is detected,
// recorded and recovered: a new boot, heartbeats flowing, the endpoint
// serving. A fourth crash within the window exhausts the restart budget.
func TestCrashRecovery(t *testing.T) {
	needIntegration(t)
	a := newDevAgent(t)
	a.mustVigil("vm", "create", "web1", "--start", "--wait", "--hang-timeout", "3s", "--min-uptime", "5s", "--max-restarts", "3")

	for i, kind := range []string{"kill", "panic", "hang"} {
		before := waitUptime(t, a, "web1", 6*time.Second)
		injected := time.Now()
		a.mustVigil("vm", "fault", "web1", kind)
		var inc api.Incident
		waitFor(t, kind+" to be recovered", 60*time.Second, func() bool {
			incs := incidents(t, a, "web1")
			if len(incs) != i+1 {
				return false
			}
			inc = incs[i]
			return inc.RecoveredAt != nil
		})
		want := map[string]string{"kill": "exit", "panic": "panic", "hang": "hang"}[kind]
		if inc.Kind != want || inc.Action != "restart" || inc.DetectedAt.IsZero() || len(inc.Evidence.Console) == 0 {
			t.Fatalf("%s: incident %+v", kind, inc)
		}
		detect := inc.DetectedAt.Sub(injected)
		limit := 2 * time.Second // exit and panic: well under a second in practice
		if kind == "hang" {
			limit = 3*time.Second + 2*time.Second // hang timeout + the fault's own delay + sampling
		}
		if detect > limit {
			t.Fatalf("%s detected %s after injection, want ≤ %s", kind, detect, limit)
		}
		after := showVM(t, a, "web1")
		if after.State != api.StateRunning || after.Guest == nil || after.Guest.BootID == before.Guest.BootID {
			t.Fatalf("%s: after recovery %+v (old boot %s)", kind, after, before.Guest.BootID)
		}
		if page := httpGet(t, "http://"+after.Endpoint+"/"); !strings.Contains(page, after.Guest.BootID) {
			t.Fatalf("%s: endpoint does not serve the new boot:\n%s", kind, page)
		}
		t.Logf("%s: detected after %s, guest back %.0f ms after detection", kind, detect.Round(time.Millisecond), inc.RecoveredInMS)
	}

	// The budget (3 restarts per hour) is used up: the next crash is final.
	waitUptime(t, a, "web1", 6*time.Second)
	a.mustVigil("vm", "fault", "web1", "kill")
	waitFor(t, "failed", 30*time.Second, func() bool { return showVM(t, a, "web1").State == api.StateFailed })
	incs := incidents(t, a, "web1")
	if len(incs) != 4 || incs[3].Action != "gave-up" {
		t.Fatalf("incidents after the budget: %+v", incs)
	}
	time.Sleep(3 * time.Second) // the reconciler must not bring it back
	if v := showVM(t, a, "web1"); v.State != api.StateFailed || v.PID != 0 {
		t.Fatalf("failed vm changed by itself: %+v", v)
	}
	if events := a.mustVigil("events"); !strings.Contains(events, "vm.incident") || !strings.Contains(events, "vm.recovered") || !strings.Contains(events, "vm.fault") {
		t.Fatalf("events lack incidents:\n%s", events)
	}
}

// TestNoFalseRestarts runs the situations that fool other monitors; nothing
// may be restarted.
func TestNoFalseRestarts(t *testing.T) {
	needIntegration(t)
	a := newDevAgent(t)
	policy := []string{"--hang-timeout", "3s", "--min-uptime", "5s"}
	a.mustVigil(append([]string{"vm", "create", "busy", "--start", "--wait"}, policy...)...)
	a.mustVigil(append([]string{"vm", "create", "calm", "--start", "--wait"}, policy...)...)
	busy := waitUptime(t, a, "busy", 6*time.Second)
	calm := waitUptime(t, a, "calm", 6*time.Second)
	hold := 8 * time.Second // well past the 3 s hang timeout

	// A guest spinning its CPU at 100 %.
	a.mustVigil("vm", "exec", "busy", "--background", "--", "while true; do :; done")
	time.Sleep(hold)
	// A guest doing heavy disk I/O.
	a.mustVigil("vm", "exec", "busy", "--background", "--", "while true; do dd if=/dev/zero of=/data/big bs=1M count=32 conv=fsync 2>/dev/null; done")
	time.Sleep(hold)
	// The guest agent stopped on that busy guest: reported, not restarted.
	a.mustVigil("vm", "fault", "busy", "agent-stop")
	waitFor(t, "agent-unwell condition", 20*time.Second, func() bool { return showVM(t, a, "busy").Condition == "agent-unwell" })
	time.Sleep(hold)

	// A VM paused by the user.
	a.mustVigil("vm", "pause", "calm")
	time.Sleep(hold)
	a.mustVigil("vm", "resume", "calm")

	// The host agent itself stopped for 15 s, then continued.
	syscall.Kill(a.cmd.Process.Pid, syscall.SIGSTOP)
	time.Sleep(15 * time.Second)
	syscall.Kill(a.cmd.Process.Pid, syscall.SIGCONT)
	time.Sleep(hold)

	// A VM booting slowly: its QEMU frozen for longer than the hang timeout
	// right after start, within the grace period.
	a.mustVigil("vm", "create", "slow", "--start", "--hang-timeout", "3s", "--min-uptime", "30s")
	slow := showVM(t, a, "slow")
	syscall.Kill(slow.PID, syscall.SIGSTOP)
	time.Sleep(hold)
	syscall.Kill(slow.PID, syscall.SIGCONT)
	if _, err := a.client().WaitGuest(t.Context(), "slow"); err != nil {
		t.Fatal(err)
	}

	for _, v := range []struct {
		name string
		boot string
		pid  int
	}{{"busy", busy.Guest.BootID, busy.PID}, {"calm", calm.Guest.BootID, calm.PID}, {"slow", "", slow.PID}} {
		if incs := incidents(t, a, v.name); len(incs) != 0 {
			t.Fatalf("%s: false incidents: %+v", v.name, incs)
		}
		now := showVM(t, a, v.name)
		if now.PID != v.pid || (v.boot != "" && now.Guest != nil && now.Guest.BootID != v.boot) || now.State != api.StateRunning {
			t.Fatalf("%s was restarted or changed: %+v", v.name, now)
		}
	}
	calmNow := showVM(t, a, "calm")
	if calmNow.Guest == nil || calmNow.Guest.BootID != calm.Guest.BootID {
		t.Fatalf("calm: %+v", calmNow.Guest)
	}
}
