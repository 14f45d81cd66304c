package hostagent

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/vigil-project/vigil/internal/health"
	"github.com/vigil-project/vigil/internal/hostproto"
	"github.com/vigil-project/vigil/internal/qemu"
)

// Health defaults; a VM's spec can override the first two.
const (
	DefaultHangTimeout = 10 * time.Second
	DefaultMinUptime   = 30 * time.Second
	healthInterval     = 250 * time.Millisecond
	consoleLines       = 50
	// usageEvery: the usage counters are refreshed every usageEvery
	// samples (5 s) while heartbeats come.
	usageEvery = 20
)

func (v *vm) healthPolicy() health.Policy {
	p := health.Policy{HangTimeout: DefaultHangTimeout, MinUptime: DefaultMinUptime, Interval: healthInterval}
	if v.spec.HangTimeoutSeconds > 0 {
		p.HangTimeout = time.Duration(v.spec.HangTimeoutSeconds) * time.Second
	}
	if v.spec.MinUptimeSeconds > 0 {
		p.MinUptime = time.Duration(v.spec.MinUptimeSeconds) * time.Second
	}
	return p
}

// watchHealth samples the VM's signals and reports hangs and an unwell
// guest agent. Crashes by exit and by panic are reported where they are
// seen (watchExit, watchQMP).
func (v *vm) watchHealth(ctx context.Context, p *qemu.Process) {
	var threads []int
	if cpus, err := p.Monitor.QueryCPUsFast(ctx); err == nil {
		for _, c := range cpus {
			threads = append(threads, c.ThreadID)
		}
	}
	clock := openThreadClock(p.PID, threads)
	defer clock.close()
	v.mu.Lock()
	mon := health.NewMonitor(v.healthPolicy())
	v.mu.Unlock()
	t := time.NewTicker(healthInterval)
	defer t.Stop()
	last := health.Healthy
	tick := 0
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		v.mu.Lock()
		mon.SetPolicy(v.healthPolicy())
		// The built-in guest always runs vigil-guest; another guest has an
		// agent once one answered.
		s := health.Sample{At: time.Now(), StartedAt: v.startedAt, RunState: v.runState,
			AgentExpected: v.agentSeen || v.spec.Image == nil && v.spec.ISO == nil}
		if v.guest != nil {
			s.LastHeartbeat = v.guest.LastHeartbeat
		}
		v.mu.Unlock()
		// The activity signals are read only when a heartbeat is late
		// (what the verdict needs), and every usageEvery for the usage
		// counters the managers' metrics show.
		tick++
		if s.Counters = health.CountersNeeded(s.At, s.LastHeartbeat) || tick%usageEvery == 0; s.Counters {
			v.readCounters(ctx, p, clock, &s)
		}
		verdict := mon.Observe(s)
		if verdict == last {
			continue
		}
		hb, act := mon.Silence()
		ev := hostproto.Evidence{LastHeartbeat: s.LastHeartbeat, HeartbeatSilenceS: hb.Seconds(), ActivitySilenceS: act.Seconds(),
			CPUTimeMS: s.CPUTime.Milliseconds(), DiskOps: s.DiskOps, RunState: s.RunState}
		switch verdict {
		case health.Hung:
			v.log.Warn("guest hung: no heartbeats and no activity", "heartbeat_silence", hb, "activity_silence", act)
			ev.Console = v.consoleTail()
			v.agent.notifyIncident(v.spec.Name, hostproto.Incident{Kind: hostproto.IncidentHang, DetectedAt: s.At.UTC(), Evidence: ev})
		case health.AgentUnwell:
			v.log.Warn("guest agent silent while the guest is active", "heartbeat_silence", hb)
			v.agent.notify(v.spec.Name, hostproto.EventHealth, true, string(verdict))
		case health.Healthy:
			if last == health.AgentUnwell || last == health.Quiet || last == health.Hung {
				v.agent.notify(v.spec.Name, hostproto.EventHealth, true, string(verdict))
			}
		}
		if verdict == health.Hung {
			// One report per episode: recovery replaces this process.
			last = verdict
			continue
		}
		last = verdict
	}
}

// readCounters reads the activity signals and usage counters of p into s
// (and keeps the usage for the VM's status).
func (v *vm) readCounters(ctx context.Context, p *qemu.Process, clock *threadClock, s *health.Sample) {
	s.CPUTime = clock.cpu()
	u := hostproto.VMUsage{CPUSeconds: s.CPUTime.Seconds()}
	qctx, cancel := context.WithTimeout(ctx, time.Second)
	if stats, err := p.Monitor.QueryBlockStats(qctx); err == nil {
		for _, b := range stats {
			s.DiskOps += b.Stats.RdOperations + b.Stats.WrOperations
			u.DiskReadBytes += b.Stats.RdBytes
			u.DiskWriteBytes += b.Stats.WrBytes
			u.DiskReadOps += b.Stats.RdOperations
			u.DiskWriteOps += b.Stats.WrOperations
		}
	}
	cancel()
	net := v.tapCounters()
	// The tap receives what the guest sends.
	u.NetTxBytes, u.NetTxPackets, u.NetRxBytes, u.NetRxPackets = net.RxBytes, net.RxPackets, net.TxBytes, net.TxPackets
	s.NetPackets = net.RxPackets
	v.mu.Lock()
	if v.proc == p {
		v.usage = &u
		v.recordUsage(s.At, u)
	}
	v.mu.Unlock()
	s.KernelAnswered, _ = v.arpAnswered()
}

// threadClock reads the CPU time of a QEMU's vCPU threads. It keeps their
// /proc stat files open and rereads them in place (4 times a second for
// every VM: opening and closing them each time was most of what an idle
// host agent did).
type threadClock struct {
	files []*os.File
	buf   []byte
}

func openThreadClock(pid int, tids []int) *threadClock {
	c := &threadClock{buf: make([]byte, 1024)}
	for _, tid := range tids {
		if f, err := os.Open(fmt.Sprintf("/proc/%d/task/%d/stat", pid, tid)); err == nil {
			c.files = append(c.files, f)
		}
	}
	return c
}

// cpu sums user+system time of the threads. It counts in the kernel's
// ticks (10 ms): a halted vCPU that the host wakes for a moment now and
// then does not count as a guest at work.
func (c *threadClock) cpu() time.Duration {
	var ticks int64
	for _, f := range c.files {
		n, err := f.ReadAt(c.buf, 0)
		if n == 0 && err != nil {
			continue
		}
		ticks += statCPUTicks(c.buf[:n])
	}
	// USER_HZ is 100 on Linux for every architecture Vigil runs on.
	return time.Duration(ticks) * 10 * time.Millisecond
}

func (c *threadClock) close() {
	for _, f := range c.files {
		f.Close()
	}
}

// statCPUTicks reads utime+stime (fields 14 and 15) of a /proc stat line.
// The command name (field 2) may contain spaces, so fields are counted
// after its closing parenthesis.
func statCPUTicks(b []byte) int64 {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0
	}
	// After ')': field 3 (state) is the first; utime is field 14, stime 15.
	field, inField := 2, false
	var u int64
	var cur int64
	for _, ch := range b[i+1:] {
		if ch == ' ' || ch == '\n' {
			if inField {
				switch field {
				case 14:
					u = cur
				case 15:
					return u + cur
				}
			}
			inField = false
			continue
		}
		if !inField {
			inField, cur = true, 0
			field++
		}
		if ch >= '0' && ch <= '9' {
			cur = cur*10 + int64(ch-'0')
		}
	}
	if inField && field == 15 {
		return u + cur
	}
	return 0
}

// consoleTail returns the last lines of the VM's current serial log.
func (v *vm) consoleTail() []string {
	f, err := os.Open(v.machine.SerialLog())
	if err != nil {
		return nil
	}
	defer f.Close()
	if fi, err := f.Stat(); err == nil && fi.Size() > 64<<10 {
		f.Seek(fi.Size()-64<<10, 0)
	}
	var lines []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 64<<10)
	for sc.Scan() {
		lines = append(lines, strings.TrimRight(sc.Text(), "\r"))
		if len(lines) > consoleLines {
			lines = lines[1:]
		}
	}
	return lines
}

func (a *Agent) notifyIncident(vm string, inc hostproto.Incident) {
	a.cfg.Notify(hostproto.Event{Time: time.Now().UTC(), Host: a.cfg.Name, VM: vm, Kind: hostproto.EventIncident,
		Message: inc.Kind, Incident: &inc})
}
