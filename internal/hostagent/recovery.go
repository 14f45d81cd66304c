package hostagent

import (
	"context"
	"fmt"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/hostproto"
)

// Restart gives the VM a fresh boot from its disk: whatever QEMU runs (a
// panicked or hung guest) is killed first. It is how crashes are recovered.
func (a *Agent) Restart(ctx context.Context, name string) error {
	v, err := a.get(name)
	if err != nil {
		return err
	}
	v.opMu.Lock()
	defer v.opMu.Unlock()
	if p, _, err := v.running(); err == nil {
		if err := v.killLocked(ctx, p); err != nil {
			return fmt.Errorf("restart %s: %w", name, err)
		}
	}
	return v.startLocked(ctx)
}

// SetHealth changes the VM's hang timeout and grace period (seconds; zero
// means the default) and records them in its spec.
func (a *Agent) SetHealth(name string, hangTimeout, minUptime int) error {
	v, err := a.get(name)
	if err != nil {
		return err
	}
	v.mu.Lock()
	v.spec.HangTimeoutSeconds, v.spec.MinUptimeSeconds = hangTimeout, minUptime
	v.mu.Unlock()
	return v.writeSpec()
}

// Fault kinds for drills.
const (
	FaultPanic     = "panic"
	FaultHang      = "hang"
	FaultAgentStop = "agent-stop"
	FaultKill      = "kill"
)

// faultCommands run in the guest. They start detached and wait a moment, so
// the guest agent can answer before the guest (or the agent) goes away.
var faultCommands = map[string]string{
	// A kernel panic that pvpanic reports (QMP GUEST_PANICKED).
	FaultPanic: "sleep 0.2; echo 1 > /proc/sys/kernel/sysrq; echo c > /proc/sysrq-trigger",
	// Freeze the whole guest (suspend-to-idle with no wakeup source): no
	// panic event, no heartbeats, no I/O, CPUs halted. A panic without
	// pvpanic would not do: the kernel's panic loop spins the vCPU at 100%,
	// which from outside is a busy guest, not a hung one.
	FaultHang: "sleep 0.2; echo freeze > /sys/power/state",
	// Freeze only the guest agent (SIGSTOP, so init does not respawn it).
	FaultAgentStop: "sleep 0.2; kill -STOP $(pidof vigil-guest)",
}

// Fault injects a real fault into a running VM, for drills and tests.
func (a *Agent) Fault(ctx context.Context, name, kind string) error {
	v, err := a.get(name)
	if err != nil {
		return err
	}
	p, _, err := v.running()
	if err != nil {
		return err
	}
	if kind == FaultKill {
		// Not through killLocked: this exit must look like a crash.
		return p.Kill(ctx)
	}
	cmd, ok := faultCommands[kind]
	if !ok {
		return fmt.Errorf("unknown fault %q: use panic, hang, agent-stop or kill", kind)
	}
	res, err := a.Exec(ctx, name, api.ExecRequest{Command: cmd, Background: true})
	if err != nil {
		return fmt.Errorf("inject %s into %s: %w", kind, name, err)
	}
	if res.Error != "" {
		return fmt.Errorf("inject %s into %s: %s", kind, name, res.Error)
	}
	a.notify(name, hostproto.EventHealth, true, "fault injected: "+kind)
	return nil
}
