package hostagent

import (
	"context"
	"fmt"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/hostproto"
)

// Restart gives the VM a fresh boot from its disk: whatever QEMU runs (a
// panicked or hung guest) is killed first. It is how crashes are recovered.
func (a *Agent) Restart(ctx context.Context, r hostproto.VMRef) (hostproto.None, error) {
	name := r.VM
	v, err := a.get(name)
	if err != nil {
		return none(err)
	}
	defer v.lockOp("restart")()
	if p, _, err := v.running(); err == nil {
		if err := v.killLocked(ctx, p); err != nil {
			return none(fmt.Errorf("restart %s: %w", name, err))
		}
	}
	return none(v.startLocked(ctx))
}

// SetHealth changes the VM's hang timeout and grace period (seconds; zero
// means the default) and records them in its spec.
func (a *Agent) SetHealth(_ context.Context, r hostproto.HealthRequest) (hostproto.None, error) {
	name, hangTimeout, minUptime := r.VM, r.HangTimeoutSeconds, r.MinUptimeSeconds
	v, err := a.get(name)
	if err != nil {
		return none(err)
	}
	v.mu.Lock()
	v.spec.HangTimeoutSeconds, v.spec.MinUptimeSeconds = hangTimeout, minUptime
	v.mu.Unlock()
	return none(v.writeSpec())
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
func (a *Agent) Fault(ctx context.Context, r hostproto.FaultRequest) (hostproto.None, error) {
	name, kind := r.VM, r.Kind
	v, err := a.get(name)
	if err != nil {
		return none(err)
	}
	p, _, err := v.running()
	if err != nil {
		return none(err)
	}
	if kind == FaultKill {
		// Not through killLocked: this exit must look like a crash.
		return none(p.Kill(ctx))
	}
	cmd, ok := faultCommands[kind]
	if kind == FaultAgentStop && v.execAgent() == agentQGA {
		cmd = "sleep 0.2; kill -STOP $(pidof qemu-ga)"
	}
	if !ok {
		return none(fmt.Errorf("%w: unknown fault %q: use panic, hang, agent-stop or kill", ErrInvalid, kind))
	}
	res, err := a.Exec(ctx, hostproto.ExecRequest{VM: name, Exec: api.ExecRequest{Command: cmd, Background: true}})
	if err != nil {
		return none(fmt.Errorf("inject %s into %s: %w", kind, name, err))
	}
	if res.Error != "" {
		return none(fmt.Errorf("inject %s into %s: %s", kind, name, res.Error))
	}
	a.notify(name, hostproto.EventHealth, true, "fault injected: "+kind)
	return hostproto.None{}, nil
}
