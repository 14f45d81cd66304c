package hostagent

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/guestproto"
	"github.com/vigil-project/vigil/internal/hostproto"
)

// askHeartbeat asks the guest agent for a heartbeat at once (after a
// resume), without waiting: the heartbeat is its own answer. Nothing is
// sent when no agent is connected.
func (v *vm) askHeartbeat() {
	v.mu.Lock()
	enc := v.guestEnc
	v.mu.Unlock()
	if enc == nil {
		return
	}
	// The write can block while the guest does not read: not the caller.
	go enc.Encode(guestproto.Message{Type: guestproto.TypeHeartbeatNow})
}

// request sends m to the guest agent and waits for the answer with its ID.
func (v *vm) request(ctx context.Context, m guestproto.Message) (guestproto.Message, error) {
	v.mu.Lock()
	enc := v.guestEnc
	if enc == nil {
		v.mu.Unlock()
		return m, fmt.Errorf("%s: %w", v.spec.Name, ErrNoGuestAgent)
	}
	if v.pending == nil {
		v.pending = map[string]chan guestproto.Message{}
	}
	v.nextID++
	m.ID = "h" + strconv.FormatUint(v.nextID, 10)
	ch := make(chan guestproto.Message, 1)
	v.pending[m.ID] = ch
	v.mu.Unlock()
	defer func() {
		v.mu.Lock()
		delete(v.pending, m.ID)
		v.mu.Unlock()
	}()
	// The write can block while the guest is not reading; the context
	// bounds the wait for the answer, which is what callers care about.
	errc := make(chan error, 1)
	go func() { errc <- enc.Encode(m) }()
	select {
	case err := <-errc:
		if err != nil {
			return m, fmt.Errorf("send to guest agent of %s: %w", v.spec.Name, err)
		}
	case <-ctx.Done():
		return m, fmt.Errorf("send to guest agent of %s: %w", v.spec.Name, ctx.Err())
	}
	select {
	case r, ok := <-ch:
		if !ok {
			return m, fmt.Errorf("%s: %w (lost while waiting)", v.spec.Name, ErrNoGuestAgent)
		}
		return r, nil
	case <-ctx.Done():
		return m, fmt.Errorf("wait for guest agent of %s: %w", v.spec.Name, ctx.Err())
	}
}

const (
	// defaultExecTimeout is the guest agent's timeout of a command that
	// names none (guestproto.Exec).
	defaultExecTimeout = 30 * time.Second
	// maxExecTimeout bounds the wait for one command (and keeps the
	// arithmetic of a huge timeout from overflowing).
	maxExecTimeout = 24 * time.Hour
	// defaultExecGrace is how long past the command's own timeout the host
	// waits for the answer: the guest kills the command at its timeout and
	// then answers, possibly slowly (a busy guest under TCG). A background
	// command is answered as soon as it started, so this is all it gets.
	defaultExecGrace = 10 * time.Second
)

// execDeadline is how long the host waits for the answer to req.
func (a *Agent) execDeadline(req api.ExecRequest) time.Duration {
	grace := a.execGrace
	if grace <= 0 {
		grace = defaultExecGrace
	}
	if req.Background {
		return grace
	}
	timeout := defaultExecTimeout
	if req.TimeoutSeconds > 0 {
		timeout = maxExecTimeout
		if req.TimeoutSeconds < int(maxExecTimeout/time.Second) {
			timeout = time.Duration(req.TimeoutSeconds) * time.Second
		}
	}
	return timeout + grace
}

// Exec runs a shell command in the guest through its agent.
func (a *Agent) Exec(ctx context.Context, r hostproto.ExecRequest) (api.ExecResult, error) {
	name, req := r.VM, r.Exec
	v, err := a.get(name)
	if err != nil {
		return api.ExecResult{}, err
	}
	// Always a deadline, whatever the caller's context: a guest that never
	// answers (hung, or its answer lost) must not hold the call forever.
	wait := a.execDeadline(req)
	rctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	// Just after a start, a resume or a migration the agents reconnect:
	// give them a moment rather than fail at once.
	v.waitAgent(rctx, agentWait)
	if v.execAgent() == agentQGA {
		res, err := v.execQGA(rctx, req)
		if err != nil && ctx.Err() == nil && errors.Is(err, context.DeadlineExceeded) {
			return api.ExecResult{}, fmt.Errorf("exec in %s: no answer from qemu-guest-agent within %s: %w", name, wait, err)
		}
		return res, err
	}
	e := guestproto.Exec{Command: req.Command, TimeoutSeconds: req.TimeoutSeconds, Background: req.Background}
	m, err := v.request(rctx, guestproto.Message{Type: guestproto.TypeExec, Exec: &e})
	if err != nil && ctx.Err() == nil && errors.Is(err, context.DeadlineExceeded) {
		return api.ExecResult{}, fmt.Errorf("exec in %s: no answer from its guest agent within %s: %w", name, wait, err)
	}
	if err != nil {
		return api.ExecResult{}, err
	}
	if m.ExecResult == nil {
		return api.ExecResult{}, fmt.Errorf("guest agent of %s sent an empty exec result", name)
	}
	x := m.ExecResult
	return api.ExecResult{ExitCode: x.ExitCode, Output: x.Output, Truncated: x.Truncated, Error: x.Error}, nil
}

// guestLimits bound what a guest can make the host do by what it sends: a
// guest controls its boot id and its heartbeat rate, and each guest-ready
// event travels to the manager and into etcd.
type guestLimits struct {
	// readyEvery is the shortest time between two guest-ready events of
	// one VM.
	readyEvery time.Duration
	// hbPerSecond and hbBurst size the token bucket of heartbeats: those
	// beyond it are ignored.
	hbPerSecond, hbBurst float64
	// warnEvery is the shortest time between two warnings about a guest
	// that exceeds its rate.
	warnEvery time.Duration
}

// defaultGuestLimits leave a well-behaved guest (one heartbeat a second, a
// reboot now and then) untouched.
func defaultGuestLimits() guestLimits {
	return guestLimits{readyEvery: 10 * time.Second, hbPerSecond: 4, hbBurst: 4, warnEvery: 10 * time.Second}
}

// guestGate applies guestLimits to one QEMU process's guest. It is not safe
// for concurrent use: the vm guards it with its mutex.
type guestGate struct {
	lim guestLimits

	tokens  float64
	filled  time.Time // when tokens was last topped up
	ignored int       // heartbeats ignored since the last warning
	warned  time.Time

	reported  bool      // a guest-ready was reported
	readyAt   time.Time // when
	readyBoot string    // for which boot
	due       bool      // a report is scheduled for the end of the window
	bootSeq   uint64    // seq of the first heartbeat of the latest boot
	lastBoot  string    // the latest boot id seen
	closed    bool      // the watcher is gone: report nothing more
	timer     *time.Timer
}

func newGuestGate(lim guestLimits) *guestGate {
	return &guestGate{lim: lim, tokens: lim.hbBurst}
}

// allow tells whether a heartbeat arriving at now is processed. warn, when
// not zero, is the number of heartbeats ignored since the last warning: the
// caller logs it (at most once per warnEvery).
func (g *guestGate) allow(now time.Time) (ok bool, warn int) {
	if !g.filled.IsZero() {
		g.tokens = min(g.lim.hbBurst, g.tokens+now.Sub(g.filled).Seconds()*g.lim.hbPerSecond)
	}
	g.filled = now
	if g.tokens >= 1 {
		g.tokens--
		return true, 0
	}
	g.ignored++
	if g.warned.IsZero() || now.Sub(g.warned) >= g.lim.warnEvery {
		warn, g.ignored, g.warned = g.ignored, 0, now
	}
	return false, warn
}

// boot is told the boot id of a processed heartbeat. It returns report
// when a guest-ready is due now (and counts it as reported), or later > 0
// when one is due at the end of the current window, which the caller
// schedules (flush). A boot id seen again is reported no more.
func (g *guestGate) boot(now time.Time, id string, seq uint64) (report bool, later time.Duration) {
	if id != g.lastBoot || g.bootSeq == 0 {
		g.lastBoot, g.bootSeq = id, seq
	}
	if g.reported && id == g.readyBoot {
		return false, 0
	}
	if !g.reported || now.Sub(g.readyAt) >= g.lim.readyEvery {
		g.markReported(now, id)
		return true, 0
	}
	if g.due {
		return false, 0 // the report at the end of the window takes the latest boot
	}
	g.due = true
	return false, g.readyAt.Add(g.lim.readyEvery).Sub(now)
}

func (g *guestGate) markReported(now time.Time, id string) {
	g.reported, g.readyAt, g.readyBoot = true, now, id
}

// limitsForGuest are the agent's guest limits; an Agent made without New
// (tests) gets the defaults.
func (a *Agent) limitsForGuest() guestLimits {
	if a.guestLimits == (guestLimits{}) {
		return defaultGuestLimits()
	}
	return a.guestLimits
}
