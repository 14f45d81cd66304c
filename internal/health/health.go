// Package health turns a VM's liveness signals into a verdict. It is pure
// logic: the host agent samples the signals (guest heartbeats, vCPU time,
// disk and network I/O, ARP answers from the guest's kernel, QEMU's run
// state) and feeds them in.
//
// Only time the agent actually observed counts. If the agent itself was
// stopped or starved (a gap between samples much longer than the sampling
// interval), the gap is not counted as silence: a guest must be seen
// silent, not assumed silent, before it is declared hung.
package health

import "time"

// Verdict is the monitor's judgement after a sample.
type Verdict string

const (
	// Healthy: heartbeats arrive.
	Healthy Verdict = "healthy"
	// Booting: within the grace period after start; never judged hung.
	Booting Verdict = "booting"
	// Paused: the guest's CPUs are stopped on purpose; never judged hung.
	Paused Verdict = "paused"
	// Quiet: heartbeats missing, but not for long enough to judge.
	Quiet Verdict = "quiet"
	// AgentUnwell: heartbeats stopped but the guest shows signs of
	// operation (CPU or I/O moving): report, do not restart.
	AgentUnwell Verdict = "agent-unwell"
	// Hung: no heartbeats and no sign of operation for the hang timeout.
	Hung Verdict = "hung"
	// NoAgent: no guest agent has ever answered for this VM (none is
	// installed, or an installer runs), so silence tells nothing: such a
	// guest is judged by its exits and panics alone.
	NoAgent Verdict = "no-agent"
)

// Policy configures judgement for one VM.
type Policy struct {
	// HangTimeout is how long a guest must be observed with neither
	// heartbeats nor activity before it is hung.
	HangTimeout time.Duration
	// MinUptime is the grace period after a start before a hang can be declared.
	MinUptime time.Duration
	// Interval is the expected time between samples; a longer gap than
	// 3×Interval is treated as unobserved.
	Interval time.Duration
}

// Sample is one reading of a VM's signals.
type Sample struct {
	At            time.Time
	StartedAt     time.Time // this QEMU process (or boot) started
	RunState      string    // QEMU's run state: "running", "paused", ...
	LastHeartbeat time.Time // arrival of the latest guest heartbeat (zero: none yet)
	// AgentExpected: the guest has an agent (one answered in some boot of
	// this VM, or its image has one), so its silence can mean a hang.
	AgentExpected bool
	// Counters says the activity signals below were read for this sample.
	// While heartbeats arrive they need not be (see CountersNeeded): a
	// heartbeat is itself a sign of life. Activity is only ever judged
	// between two samples that both read them.
	Counters bool
	CPUTime  time.Duration
	DiskOps  uint64 // read + write operations, all disks
	// NetPackets counts frames the guest sent (its taps' receive side),
	// when it is on a network.
	NetPackets uint64
	// KernelAnswered is when the guest's kernel last answered an ARP probe
	// for its address (zero: never, or not on a network). The kernel
	// answers ARP without any process: a guest that answers lives, even
	// with its agent frozen.
	KernelAnswered time.Time
}

// Monitor accumulates observed silence for one VM. Not safe for concurrent use.
type Monitor struct {
	policy Policy
	prev   *Sample
	// silence of heartbeats and of activity, counted in observed time
	hbSilent, actSilent time.Duration
	// cpuInSilence is the vCPU time used during the current activity silence
	cpuInSilence time.Duration
}

// A guest counts as active when, since its activity silence began, its
// vCPUs used more than busyFraction of the time — and at least minCPU, so
// one stray 10 ms clock tick is not taken for life. An idle or frozen
// kernel still takes the odd timer tick; a working one uses far more.
const (
	busyFraction = 0.03
	minCPU       = 20 * time.Millisecond
)

// CountersNeeded says whether a sample taken at, whose latest heartbeat
// arrived at lastHeartbeat, must read the activity signals: they only
// matter once a heartbeat is late (or before the first one), and reading
// them (QEMU's block statistics, /proc) four times a second for every VM
// was most of what an idle host agent did.
func CountersNeeded(at, lastHeartbeat time.Time) bool {
	return lastHeartbeat.IsZero() || at.Sub(lastHeartbeat) >= CountersAfter
}

// CountersAfter is the heartbeat silence from which the activity signals
// are read: heartbeats come every second.
const CountersAfter = 1250 * time.Millisecond

// NewMonitor returns a monitor with policy p.
func NewMonitor(p Policy) *Monitor {
	if p.Interval <= 0 {
		p.Interval = 250 * time.Millisecond
	}
	return &Monitor{policy: p}
}

// SetPolicy changes the policy from the next sample on.
func (m *Monitor) SetPolicy(p Policy) {
	if p.Interval <= 0 {
		p.Interval = m.policy.Interval
	}
	m.policy = p
}

// Reset forgets everything (a new QEMU process, or a resume).
func (m *Monitor) Reset() {
	m.prev = nil
	m.hbSilent, m.actSilent, m.cpuInSilence = 0, 0, 0
}

// Silence reports the observed time without heartbeats and without activity.
func (m *Monitor) Silence() (heartbeats, activity time.Duration) { return m.hbSilent, m.actSilent }

// Observe takes a sample and returns the verdict.
func (m *Monitor) Observe(s Sample) Verdict {
	prev := m.prev
	m.prev = &s
	if s.RunState != "running" {
		// Paused by the user, suspended, migrating: not the guest's doing.
		m.hbSilent, m.actSilent, m.cpuInSilence = 0, 0, 0
		return Paused
	}
	if prev == nil || prev.RunState != "running" {
		return m.judge(s)
	}
	dt := s.At.Sub(prev.At)
	if dt <= 0 || dt > 3*m.policy.Interval {
		// We were not watching (agent stopped or starved): count nothing,
		// and let the next sample compare against this one.
		return m.judge(s)
	}
	if s.LastHeartbeat.After(prev.LastHeartbeat) {
		// A heartbeat is the guest at work: activity silence starts anew.
		m.hbSilent, m.actSilent, m.cpuInSilence = 0, 0, 0
		return m.judge(s)
	}
	m.hbSilent += dt
	if !s.Counters || !prev.Counters {
		// Nothing to compare: the silence since the last sign of life
		// (a heartbeat, or a change last seen) goes on.
		m.actSilent += dt
		return m.judge(s)
	}
	if s.DiskOps != prev.DiskOps || s.NetPackets != prev.NetPackets || s.KernelAnswered.After(prev.KernelAnswered) {
		m.actSilent, m.cpuInSilence = 0, 0
	} else {
		m.actSilent += dt
		if d := s.CPUTime - prev.CPUTime; d > 0 {
			m.cpuInSilence += d
		}
		if m.cpuInSilence >= minCPU && float64(m.cpuInSilence) > busyFraction*float64(m.actSilent) {
			m.actSilent, m.cpuInSilence = 0, 0
		}
	}
	return m.judge(s)
}

func (m *Monitor) judge(s Sample) Verdict {
	booting := s.At.Sub(s.StartedAt) < m.policy.MinUptime
	switch {
	case !s.AgentExpected && s.LastHeartbeat.IsZero():
		return NoAgent
	case m.hbSilent < m.policy.HangTimeout:
		if booting && s.LastHeartbeat.IsZero() {
			return Booting
		}
		if m.hbSilent > 2*m.policy.Interval && m.hbSilent > 1500*time.Millisecond {
			return Quiet
		}
		return Healthy
	case booting:
		return Booting
	case m.actSilent >= m.policy.HangTimeout:
		return Hung
	default:
		return AgentUnwell
	}
}
