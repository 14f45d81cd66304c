package hostagent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/qga"
)

// What each kind of guest agent is called in GuestInfo.Agent.
const (
	agentVigil = "vigil"
	agentQGA   = "qemu-ga"
)

// qgaTimings are how the host watches qemu-guest-agent.
type qgaTimings struct {
	// every is the heartbeat: one guest-ping (after guest-sync-delimited
	// on each new connection) per period.
	every time.Duration
	// answer bounds each exchange; a guest that does not answer in time is
	// silent, which the health monitor weighs against its activity.
	answer time.Duration
	// bootEvery is how often the boot id and uptime are read again even
	// when no ping was missed (a reboot is normally seen as missed pings).
	bootEvery time.Duration
	// infoEvery is how often the OS, host name and addresses are read.
	infoEvery time.Duration
}

func defaultQGATimings() qgaTimings {
	return qgaTimings{every: time.Second, answer: 3 * time.Second, bootEvery: 15 * time.Second, infoEvery: 30 * time.Second}
}

// qgaState is what the watcher learned of the guest through qemu-ga.
type qgaState struct {
	bootID    string
	uptime    float64   // at uptimeAt
	uptimeAt  time.Time //
	seq       uint64    // pings answered in this boot
	bootRead  time.Time
	infoRead  time.Time
	os        string
	hostname  string
	addresses []string
}

// watchQGA keeps a client of the VM's qemu-guest-agent, pings it every
// second as the heartbeat of guests without vigil-guest, and learns the
// guest's boot id, OS, host name and addresses. A guest without the agent
// costs one connection attempt per period: QEMU accepts it and nothing
// answers.
func (v *vm) watchQGA(ctx context.Context, g *guestGate) {
	t := v.agent.qgaTimings
	if t == (qgaTimings{}) {
		t = defaultQGATimings()
	}
	var cl *qga.Client
	defer func() {
		v.mu.Lock()
		v.qga = nil
		v.mu.Unlock()
		if cl != nil {
			cl.Close()
		}
	}()
	var st qgaState
	answered := false
	for {
		if !v.waitArrived(ctx) {
			return
		}
		began := time.Now()
		if cl == nil {
			dctx, cancel := context.WithTimeout(ctx, t.answer)
			c, err := qga.Dial(dctx, v.machine.QGASocket())
			cancel()
			if err == nil {
				cl = c
				v.mu.Lock()
				v.qga = cl
				v.mu.Unlock()
			}
		}
		if cl != nil {
			pctx, cancel := context.WithTimeout(ctx, t.answer)
			err := cl.Ping(pctx)
			cancel()
			switch {
			case err == nil:
				// After silence the guest may have rebooted: look again.
				v.qgaAnswered(ctx, cl, g, &st, t, !answered)
				answered = true
			case ctx.Err() != nil:
				return
			default:
				answered = false
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(t.every - time.Since(began)):
		}
	}
}

// qgaAnswered records a ping the agent answered: the heartbeat, and
// (when due, or after silence) the boot id and what the guest tells of
// itself.
func (v *vm) qgaAnswered(ctx context.Context, cl *qga.Client, g *guestGate, st *qgaState, t qgaTimings, afterSilence bool) {
	now := time.Now()
	newBoot := false
	if afterSilence || now.Sub(st.bootRead) >= t.bootEvery {
		rctx, cancel := context.WithTimeout(ctx, t.answer)
		id, uptime, err := readBoot(rctx, cl)
		cancel()
		if err != nil {
			v.log.Debug("qemu-ga: read boot id", "err", err)
			if st.bootID == "" {
				return // no heartbeat without knowing which boot it is from
			}
		} else {
			newBoot = id != st.bootID
			if newBoot {
				*st = qgaState{bootID: id}
			}
			st.uptime, st.uptimeAt, st.bootRead = uptime, now, now
		}
	}
	if v.takeResync() {
		// As VMware Tools does after a resume: the guest's clock is
		// behind by as long as it was paused or saved.
		sctx, cancel := context.WithTimeout(ctx, t.answer)
		err := cl.Run(sctx, "guest-set-time", map[string]int64{"time": time.Now().UnixNano()}, nil)
		cancel()
		if err != nil {
			v.log.Info("qemu-ga could not set the guest's clock after a resume", "err", err)
		} else {
			v.log.Debug("guest clock set after a resume")
		}
	}
	if newBoot || now.Sub(st.infoRead) >= t.infoEvery {
		ictx, cancel := context.WithTimeout(ctx, 3*t.answer)
		v.readGuestInfo(ictx, cl, st)
		cancel()
		st.infoRead = now
	}
	st.seq++

	v.mu.Lock()
	gi := v.guest
	if gi != nil && gi.Agent == agentVigil && now.Sub(gi.LastHeartbeat) < 3*t.every {
		// vigil-guest beats: qemu-ga adds what only it tells.
		c := *gi
		c.OS, c.Hostname, c.Addresses = st.os, st.hostname, st.addresses
		v.guest = &c
		v.mu.Unlock()
		return
	}
	v.guest = &api.GuestInfo{
		BootID: st.bootID, Seq: st.seq, UptimeSeconds: st.uptime + now.Sub(st.uptimeAt).Seconds(), LastHeartbeat: now.UTC(),
		Agent: agentQGA, OS: st.os, Hostname: st.hostname, Addresses: st.addresses,
	}
	v.agentSeen = true
	report, later := g.boot(now, st.bootID, st.seq)
	if later > 0 {
		g.timer = time.AfterFunc(later, func() { v.flushReady(g) })
	}
	v.mu.Unlock()
	if report {
		v.reportReady(st.bootID, st.seq)
	}
}

// readBoot reads the guest kernel's boot id and uptime through the agent.
func readBoot(ctx context.Context, cl *qga.Client) (string, float64, error) {
	b, err := cl.ReadFile(ctx, "/proc/sys/kernel/random/boot_id", 64)
	if err != nil {
		return "", 0, err
	}
	id, err := parseBootID(b)
	if err != nil {
		return "", 0, err
	}
	u, err := cl.ReadFile(ctx, "/proc/uptime", 64)
	if err != nil {
		return id, 0, nil // the boot id is what matters
	}
	up, _ := parseUptime(u)
	return id, up, nil
}

// parseBootID checks what a guest says is its boot id: the guest is not
// trusted, and the id ends up in events and etcd.
func parseBootID(b []byte) (string, error) {
	s := string(bytes.TrimSpace(b))
	if len(s) != 36 || strings.Count(s, "-") != 4 {
		return "", fmt.Errorf("boot id %.40q is not a uuid", s)
	}
	for _, c := range s {
		if !(c == '-' || c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return "", fmt.Errorf("boot id %.40q is not a uuid", s)
		}
	}
	return s, nil
}

// parseUptime reads the first number of /proc/uptime.
func parseUptime(b []byte) (float64, error) {
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 0, errors.New("empty /proc/uptime")
	}
	up, err := strconv.ParseFloat(f[0], 64)
	if err != nil || !(up >= 0 && up <= 1e10) { // NaN fails both
		return 0, fmt.Errorf("uptime %.20q: not a number of seconds", f[0])
	}
	return up, nil
}

// Bounds on what a guest tells of itself.
const (
	maxGuestAddresses = 32
	maxGuestString    = 128
)

// readGuestInfo asks the agent for the OS, host name and addresses; what
// it cannot tell stays as it was.
func (v *vm) readGuestInfo(ctx context.Context, cl *qga.Client, st *qgaState) {
	if oi, err := cl.OSInfo(ctx); err == nil {
		name := oi.PrettyName
		if name == "" {
			name = strings.TrimSpace(oi.Name + " " + oi.Version)
		}
		st.os = clip(name)
	}
	if h, err := cl.HostName(ctx); err == nil {
		st.hostname = clip(h)
	}
	if ifs, err := cl.Interfaces(ctx); err == nil {
		st.addresses = guestAddresses(ifs)
	}
}

// guestAddresses lists a guest's addresses worth showing: not loopback,
// not link-local; valid ones only, at most maxGuestAddresses, sorted.
func guestAddresses(ifs []qga.Interface) []string {
	var out []string
	for _, i := range ifs {
		for _, a := range i.IPAddresses {
			ip, err := netip.ParseAddr(a.Address)
			if err != nil || ip.IsLoopback() || ip.IsLinkLocalUnicast() || ip.IsUnspecified() {
				continue
			}
			out = append(out, netip.PrefixFrom(ip, min(max(a.Prefix, 0), ip.BitLen())).String())
		}
	}
	slices.Sort(out)
	out = slices.Compact(out)
	if len(out) > maxGuestAddresses {
		out = out[:maxGuestAddresses]
	}
	return out
}

// clip keeps guest-provided text printable and short.
func clip(s string) string {
	s = strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return -1
		}
		return r
	}, s)
	if len(s) > maxGuestString {
		s = s[:maxGuestString]
	}
	return strings.ToValidUTF8(s, "")
}

// qgaClient is the VM's qemu-ga client when its agent answers, else nil.
func (v *vm) qgaClient() *qga.Client {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.qga
}

// execAgent is the agent that runs commands in the guest: vigil-guest when
// it beats, else qemu-ga when it answers, else vigil-guest (whose absence
// is then the error). The vigil port's socket alone says nothing: QEMU
// accepts the connection whether or not anything in the guest listens.
func (v *vm) execAgent() string {
	v.mu.Lock()
	defer v.mu.Unlock()
	vigilBeats := v.guestEnc != nil && !v.vigilAt.IsZero() && time.Since(v.vigilAt) < 5*time.Second
	if !vigilBeats && v.qga != nil {
		return agentQGA
	}
	return agentVigil
}

// maxExecOutput bounds each of stdout and stderr of a command run through
// qemu-ga, as vigil-guest bounds its output.
const maxExecOutput = 1 << 20

// execQGA runs a shell command through qemu-ga's guest-exec. ctx carries
// the deadline (the command's timeout plus grace); a command that outlives
// it is killed with timeout(1) in the guest, since the agent cannot kill.
func (v *vm) execQGA(ctx context.Context, req api.ExecRequest) (api.ExecResult, error) {
	cl := v.qgaClient()
	if cl == nil {
		return api.ExecResult{}, fmt.Errorf("%s: %w", v.spec.Name, ErrNoGuestAgent)
	}
	if req.Background {
		// Started detached, its output discarded, the answer at once.
		err := cl.Run(ctx, "guest-exec", map[string]any{"path": "/bin/sh", "arg": []string{"-c", req.Command}, "capture-output": false}, nil)
		if err != nil {
			return api.ExecResult{}, fmt.Errorf("exec in %s: %w", v.spec.Name, err)
		}
		return api.ExecResult{}, nil
	}
	timeout := defaultExecTimeout
	if req.TimeoutSeconds > 0 {
		timeout = min(time.Duration(req.TimeoutSeconds)*time.Second, maxExecTimeout)
	}
	// timeout(1) is in coreutils, on every distribution qemu-ga runs on.
	// Standard error joins standard output, in order, as with vigil-guest.
	args := []string{"-k", "5", strconv.Itoa(int(timeout / time.Second)), "/bin/sh", "-c", "exec 2>&1\n" + req.Command}
	res, err := cl.Exec(ctx, "timeout", args, nil, nil, maxExecOutput)
	if err != nil {
		var qe *qga.Error
		if errors.As(err, &qe) {
			return api.ExecResult{Error: qe.Error()}, nil
		}
		return api.ExecResult{}, fmt.Errorf("exec in %s: %w", v.spec.Name, err)
	}
	out := api.ExecResult{ExitCode: res.ExitCode, Output: string(res.Stdout) + string(res.Stderr), Truncated: res.Truncated}
	switch {
	case res.ExitCode == 124:
		out.Error = fmt.Sprintf("timed out after %s", timeout)
	case res.Signal != 0:
		out.Error = fmt.Sprintf("killed by signal %d", res.Signal)
	}
	return out, nil
}

// setResync asks for the guest's clock to be set once qemu-ga answers
// (after a resume, in memory or from a saved state).
func (v *vm) setResync() {
	v.mu.Lock()
	v.resync = true
	v.mu.Unlock()
}

func (v *vm) takeResync() bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	r := v.resync
	v.resync = false
	return r
}

// agentWait is how long a command waits for a guest agent to (re)connect.
const agentWait = 10 * time.Second

// waitAgent returns once vigil-guest beats or qemu-ga answers, after d, or
// when ctx ends.
func (v *vm) waitAgent(ctx context.Context, d time.Duration) {
	deadline := time.Now().Add(d)
	for {
		v.mu.Lock()
		ready := v.qga != nil || v.guestEnc != nil && !v.vigilAt.IsZero() && time.Since(v.vigilAt) < 5*time.Second
		running := v.proc != nil
		v.mu.Unlock()
		if ready || !running || time.Now().After(deadline) {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(50 * time.Millisecond):
		}
	}
}
