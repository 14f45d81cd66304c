package health

import (
	"testing"
	"time"
)

// script drives a monitor through samples every interval, with a function
// deciding each sample's signals, and returns the verdicts.
type step struct {
	at         time.Duration // since start
	hb         bool          // a new heartbeat arrived since the last sample
	active     bool          // CPU or I/O moved
	runState   string
	skipWatch  bool // the agent was not sampling before this one
	noCounters bool // the activity signals were not read
}

func run(p Policy, steps []step) []Verdict { return runAgent(p, steps, true) }

func runAgent(p Policy, steps []step, agent bool) []Verdict {
	m := NewMonitor(p)
	start := time.Unix(1000, 0)
	var s Sample
	s.StartedAt = start
	s.AgentExpected = agent
	var out []Verdict
	for _, st := range steps {
		s.At = start.Add(st.at)
		if st.hb {
			s.LastHeartbeat = s.At
		}
		if st.active {
			s.CPUTime += 50 * time.Millisecond
		} else {
			s.CPUTime += time.Millisecond // an idle or frozen kernel's odd timer tick
		}
		s.RunState = st.runState
		if s.RunState == "" {
			s.RunState = "running"
		}
		s.Counters = !st.noCounters
		out = append(out, m.Observe(s))
	}
	return out
}

// every returns steps at interval i from a to b (exclusive), all alike.
func every(a, b, i time.Duration, hb, active bool, rs string) []step {
	var out []step
	for t := a; t < b; t += i {
		out = append(out, step{at: t, hb: hb, active: active, runState: rs})
	}
	return out
}

func last(v []Verdict) Verdict { return v[len(v)-1] }

func TestMonitor(t *testing.T) {
	const i = 250 * time.Millisecond
	p := Policy{HangTimeout: 3 * time.Second, MinUptime: 5 * time.Second, Interval: i}
	cat := func(parts ...[]step) []step {
		var out []step
		for _, x := range parts {
			out = append(out, x...)
		}
		return out
	}
	tests := []struct {
		name  string
		steps []step
		want  Verdict
	}{
		{"heartbeats flowing", every(0, 10*time.Second, i, true, true, ""), Healthy},
		{"booting without heartbeats", every(0, 4*time.Second, i, false, true, ""), Booting},
		{"booting, silent and idle, still in grace", every(0, 4900*time.Millisecond, i, false, false, ""), Booting},
		{"silent and idle after grace", cat(every(0, 6*time.Second, i, true, true, ""), every(6*time.Second, 9500*time.Millisecond, i, false, false, "")), Hung},
		{"silent a little while", cat(every(0, 6*time.Second, i, true, true, ""), every(6*time.Second, 8*time.Second, i, false, false, "")), Quiet},
		{"silent but busy: agent unwell", cat(every(0, 6*time.Second, i, true, true, ""), every(6*time.Second, 10*time.Second, i, false, true, "")), AgentUnwell},
		{"paused by the user for long", cat(every(0, 6*time.Second, i, true, true, ""), every(6*time.Second, 20*time.Second, i, false, false, "paused")), Paused},
		{"resumed after a long pause", cat(every(0, 6*time.Second, i, true, true, ""), every(6*time.Second, 20*time.Second, i, false, false, "paused"), every(20*time.Second, 21*time.Second, i, false, false, "")), Healthy},
		{"activity resets the hang clock", cat(every(0, 6*time.Second, i, true, true, ""), every(6*time.Second, 7*time.Second, i, false, false, ""), []step{{at: 7 * time.Second, active: true}}, every(7250*time.Millisecond, 10*time.Second, i, false, false, "")), AgentUnwell},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := last(run(p, tt.steps)); got != tt.want {
				t.Fatalf("verdict %s, want %s", got, tt.want)
			}
		})
	}
}

// TestFrozenGuestWithStrayTicksIsHung: a frozen guest (s2idle) still shows a
// 10 ms tick now and then; that is not activity.
func TestFrozenGuestWithStrayTicksIsHung(t *testing.T) {
	p := Policy{HangTimeout: 3 * time.Second, MinUptime: time.Second, Interval: 250 * time.Millisecond}
	m := NewMonitor(p)
	start := time.Unix(1000, 0)
	s := Sample{StartedAt: start, RunState: "running", LastHeartbeat: start.Add(2 * time.Second), Counters: true}
	var v Verdict
	for i := 0; i <= 32; i++ { // 8 s, heartbeats stopped at 2 s
		s.At = start.Add(time.Duration(i) * 250 * time.Millisecond)
		if i%8 == 0 {
			s.CPUTime += 10 * time.Millisecond
		}
		v = m.Observe(s)
	}
	if v != Hung {
		t.Fatalf("verdict %s, want hung", v)
	}
}

// TestAgentStoppedIsNotSilence: the agent was stopped (SIGSTOP) for 15 s; the
// guest was fine all along. The gap must not count as silence.
func TestAgentStoppedIsNotSilence(t *testing.T) {
	const i = 250 * time.Millisecond
	p := Policy{HangTimeout: 3 * time.Second, MinUptime: time.Second, Interval: i}
	steps := every(0, 5*time.Second, i, true, true, "")
	// 15 s without samples; the first sample after it sees heartbeats that
	// had queued up.
	steps = append(steps, step{at: 20 * time.Second, hb: true, active: true})
	steps = append(steps, every(20250*time.Millisecond, 22*time.Second, i, true, true, "")...)
	for n, v := range run(p, steps) {
		if v == Hung || v == AgentUnwell {
			t.Fatalf("sample %d: %s after the agent was stopped", n, v)
		}
	}
	// Even a sample that finds no new heartbeat right after the gap is not hung.
	steps = every(0, 5*time.Second, i, true, true, "")
	steps = append(steps, step{at: 20 * time.Second})
	if v := last(run(p, steps)); v == Hung {
		t.Fatal("one quiet sample after an unobserved gap was judged hung")
	}
}

// TestGuestWithoutAgent: a guest no agent ever answered for (an installer
// waiting at a prompt, an image without qemu-guest-agent) is never judged
// hung, however idle; once an agent is known, silence counts again.
func TestGuestWithoutAgent(t *testing.T) {
	const i = 250 * time.Millisecond
	p := Policy{HangTimeout: 3 * time.Second, MinUptime: 5 * time.Second, Interval: i}
	for _, tt := range []struct {
		name  string
		steps []step
		agent bool
		want  Verdict
	}{
		{"idle for a minute, no agent", every(0, time.Minute, i, false, false, ""), false, NoAgent},
		{"busy, no agent", every(0, time.Minute, i, false, true, ""), false, NoAgent},
		{"idle for a minute, agent known but silent", every(0, time.Minute, i, false, false, ""), true, Hung},
		{"no agent expected, but one answers", append(every(0, 6*time.Second, i, true, true, ""), every(6*time.Second, 10*time.Second, i, false, false, "")...), false, Hung},
	} {
		t.Run(tt.name, func(t *testing.T) {
			v := runAgent(p, tt.steps, tt.agent)
			if got := last(v); got != tt.want {
				t.Fatalf("verdict %s, want %s", got, tt.want)
			}
		})
	}
}

// TestCountersOnlyWhenLate: as the host agent samples (activity signals
// read only once a heartbeat is late), a hang is judged no later than with
// them read all along, and activity seen once they are read again still
// saves a guest whose agent froze.
func TestCountersOnlyWhenLate(t *testing.T) {
	const i = 250 * time.Millisecond
	p := Policy{HangTimeout: 3 * time.Second, MinUptime: time.Second, Interval: i}
	hangAt := func(lazy, activeAfter bool) time.Duration {
		m := NewMonitor(p)
		start := time.Unix(1000, 0)
		s := Sample{StartedAt: start, RunState: "running", AgentExpected: true}
		for at := time.Duration(0); at < 20*time.Second; at += i {
			s.At = start.Add(at)
			alive := at < 5*time.Second
			if alive && at%time.Second == 0 {
				s.LastHeartbeat = s.At
			}
			if alive || activeAfter {
				s.CPUTime += 50 * time.Millisecond
			}
			s.Counters = !lazy || CountersNeeded(s.At, s.LastHeartbeat)
			if m.Observe(s) == Hung {
				return at
			}
		}
		return -1
	}
	eager, lazy := hangAt(false, false), hangAt(true, false)
	if lazy < 0 || eager < 0 || lazy > eager {
		t.Fatalf("hung at %s reading the signals only when late, %s reading them always", lazy, eager)
	}
	if got := hangAt(true, true); got >= 0 {
		t.Fatalf("a busy guest whose agent stopped was judged hung at %s", got)
	}
	if !CountersNeeded(time.Unix(10, 0), time.Time{}) || CountersNeeded(time.Unix(10, 0), time.Unix(9, 500)) || !CountersNeeded(time.Unix(10, 0), time.Unix(8, 0)) {
		t.Fatal("CountersNeeded")
	}
}
