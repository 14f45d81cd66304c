package hostagent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/guestproto"
	"github.com/vigil-project/vigil/internal/hostproto"
	"github.com/vigil-project/vigil/internal/qemu"
	"github.com/vigil-project/vigil/internal/qga"
)

// vm is one VM's supervision state on this host.
type vm struct {
	agent   *Agent
	spec    hostproto.VMSpec
	machine qemu.Machine
	// storeDir holds the disk, saved state and snapshots (see Agent.storeDir).
	storeDir string
	log      *slog.Logger

	// opMu serialises the operations on this VM (take it with lockOp, so
	// the status says what runs).
	opMu sync.Mutex

	mu        sync.Mutex
	creating  bool
	proc      *qemu.Process
	startedAt time.Time
	runState  string
	stopping  bool   // an exit now is the one we asked for
	guestOff  bool   // the guest powered itself off: its exit is a clean stop
	detached  bool   // the agent is shutting down: an exit is not the VM's
	fencing   string // why the host is killing it to fence; its exit is no crash
	incoming  bool   // the destination of a live migration in progress
	busy      string // the operation holding opMu (see lockOp)
	guest     *api.GuestInfo
	usage     *hostproto.VMUsage  // the health watch's latest sample of proc
	history   usageRing           // its samples of the last quarter of an hour
	guestEnc  *guestproto.Encoder // set while connected to the guest agent
	qga       *qga.Client         // set while qemu-guest-agent answers
	vigilAt   time.Time           // the latest vigil-guest heartbeat of this process
	// resync: the guest's clock stood still while it was paused or saved;
	// qemu-ga sets it from the host's once it answers.
	resync bool
	// agentSeen: some guest agent has answered in a boot of this VM, so
	// silence from it can mean a hang. A guest never heard from (no agent
	// installed, an installer) is judged by its exits and panics only.
	agentSeen bool
	pending   map[string]chan guestproto.Message
	nextID    uint64
	cancel    context.CancelFunc // ends the watchers of proc
	exited    chan struct{}      // closed by the watcher when proc is gone
}

// lockOp takes the VM's operation lock for the operation named what, which
// the VM's status reports until the returned func releases it: a manager
// settling what a dead manager left waits while the host is still at it.
func (v *vm) lockOp(what string) func() {
	v.opMu.Lock()
	v.mu.Lock()
	v.busy = what
	v.mu.Unlock()
	return func() {
		v.mu.Lock()
		v.busy = ""
		v.mu.Unlock()
		v.opMu.Unlock()
	}
}

func (v *vm) status() hostproto.VMStatus {
	prot := v.agent.protectionStatus(v.spec.Name) // takes the agent's lock: not under v.mu
	v.mu.Lock()
	defer v.mu.Unlock()
	s := hostproto.VMStatus{Name: v.spec.Name, Busy: v.busy, Protection: prot}
	if _, err := os.Stat(v.stateFile()); err == nil {
		s.SavedState = true
	}
	if v.proc != nil {
		s.Running = true
		s.PID = v.proc.PID
		s.RunState = v.runState
		s.StartedAt = v.startedAt
		if v.guest != nil {
			g := *v.guest
			s.Guest = &g
		}
		if v.usage != nil {
			u := *v.usage
			s.Usage = &u
		}
	}
	return s
}

func (v *vm) start(ctx context.Context) error {
	defer v.lockOp("start")()
	return v.startLocked(ctx)
}

func (v *vm) startLocked(ctx context.Context) error {
	v.mu.Lock()
	running := v.proc != nil
	v.mu.Unlock()
	if running {
		return fmt.Errorf("start %s: %w", v.spec.Name, ErrRunning)
	}
	if err := v.mayLaunch(v.machine, false); err != nil {
		return err
	}
	// A cold boot moves the disk on from any saved instant: a state file
	// left from a suspend must never be loaded over it by a later resume.
	// It goes only once this host is sure to boot the VM (a refused start
	// leaves the pool's files alone), and before QEMU touches the disk.
	if err := os.Remove(v.stateFile()); err == nil {
		v.log.Warn("cold boot: discarded the saved state, which no longer matches the disk", "file", v.stateFile())
	} else if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("start %s: discard its saved state before a cold boot: %w", v.spec.Name, err)
	}
	if err := v.prepareBoot(ctx); err != nil {
		return err
	}
	p, err := qemu.Start(ctx, v.agent.qemuBin, v.machine)
	if err != nil {
		return err
	}
	v.log.Info("qemu started", "pid", p.PID)
	v.attach(p)
	v.agent.notify(v.spec.Name, hostproto.EventStarted, true, fmt.Sprintf("pid %d", p.PID))
	return nil
}

// attach starts supervising a QEMU process: its exit, its QMP events and its
// guest agent channel.
//
// It returns a channel closed once the host holds the guest agent's
// channel (its socket) for this process.
func (v *vm) attach(p *qemu.Process) <-chan struct{} {
	ctx, cancel := context.WithCancel(context.Background())
	v.mu.Lock()
	v.proc = p
	v.startedAt = time.Now().UTC()
	v.runState = "running"
	v.stopping = false
	v.guestOff = false
	v.detached = false
	v.fencing = ""
	v.guest = nil
	v.vigilAt = time.Time{}
	v.cancel = cancel
	v.exited = make(chan struct{})
	exited := v.exited
	v.mu.Unlock()

	if st, err := p.Monitor.QueryStatus(ctx); err == nil {
		v.setRunState(st.Status)
	}
	// One gate per QEMU process, shared by both agents' watchers and kept
	// across reconnections: a new process is the host's doing, so its
	// first boot is reported at once, while what one guest sends is
	// bounded for as long as it runs.
	g := newGuestGate(v.agent.limitsForGuest())
	context.AfterFunc(ctx, func() {
		v.mu.Lock()
		defer v.mu.Unlock()
		g.closed = true
		if g.timer != nil {
			g.timer.Stop()
		}
	})
	v.agent.wg.Add(4)
	go func() { defer v.agent.wg.Done(); v.watchExit(ctx, p, exited) }()
	go func() { defer v.agent.wg.Done(); v.watchQMP(ctx, p) }()
	linked := make(chan struct{})
	go func() { defer v.agent.wg.Done(); v.watchGuest(ctx, g, linked) }()
	go func() { defer v.agent.wg.Done(); v.watchHealth(ctx, p) }()
	if v.machine.GuestAgent {
		v.agent.wg.Go(func() { v.watchQGA(ctx, g) })
	}
	return linked
}

// watchExit waits for the QMP connection to end and then for the process to
// be gone; a closed socket alone could be the agent detaching.
func (v *vm) watchExit(ctx context.Context, p *qemu.Process, exited chan struct{}) {
	<-p.Exited()
	v.mu.Lock()
	detached := v.detached
	v.mu.Unlock()
	if detached {
		return
	}
	waitCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	err := qemu.WaitGone(waitCtx, p.PID)
	cancel()
	if err != nil {
		// QMP died but QEMU lives: it is wedged. Kill it so the state is known.
		v.log.Warn("qmp connection lost but qemu still alive; killing it", "pid", p.PID)
		killCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		p.Kill(killCtx)
		cancel()
	}
	detected := time.Now().UTC()
	v.mu.Lock()
	expected := v.stopping || v.guestOff
	guestOff := v.guestOff && !v.stopping
	fencing := v.fencing
	var lastHB time.Time
	if v.guest != nil {
		lastHB = v.guest.LastHeartbeat
	}
	v.proc = nil
	v.guest = nil
	v.usage = nil
	v.runState = ""
	if v.cancel != nil {
		v.cancel()
	}
	v.mu.Unlock()
	close(exited)
	v.unplugNICs()
	msg := "qemu exited"
	if guestOff {
		msg = hostproto.MsgGuestPoweredOff
	}
	if !expected {
		msg = "qemu exited unexpectedly"
		v.log.Warn(msg, "pid", p.PID)
	} else {
		v.log.Info(msg, "pid", p.PID)
	}
	_ = ctx
	if fencing != "" {
		v.agent.cfg.Notify(hostproto.Event{Time: detected, Host: v.agent.cfg.Name, VM: v.spec.Name, Kind: hostproto.EventFenced,
			Expected: true, Message: fencing})
		return
	}
	e := hostproto.Event{Time: detected, Host: v.agent.cfg.Name, VM: v.spec.Name, Kind: hostproto.EventExited, Expected: expected, Message: msg}
	if !expected {
		e.Incident = &hostproto.Incident{Kind: hostproto.IncidentExit, DetectedAt: detected, Evidence: hostproto.Evidence{
			LastHeartbeat: lastHB, Detail: fmt.Sprintf("qemu (pid %d) exited without being asked", p.PID), Console: v.consoleTail()}}
	}
	v.agent.cfg.Notify(e)
}

func (v *vm) watchQMP(ctx context.Context, p *qemu.Process) {
	events, cancel := p.Monitor.Subscribe()
	defer cancel()
	for {
		select {
		case <-ctx.Done():
			return
		case ev, ok := <-events:
			if !ok {
				return
			}
			switch ev.Name {
			case "STOP":
				v.mu.Lock()
				panicked := v.runState == "guest-panicked"
				// A live save (a snapshot, a protected VM's checkpoint)
				// stops the guest for milliseconds and continues it: not a
				// change of state for anyone to see.
				momentary := v.busy == "checkpoint" || v.busy == "snapshot"
				v.mu.Unlock()
				if !panicked && !momentary {
					v.setRunState("paused")
				}
			case "RESUME":
				v.setRunState("running")
			case "SHUTDOWN":
				var d struct {
					Guest  bool   `json:"guest"`
					Reason string `json:"reason"`
				}
				json.Unmarshal(ev.Data, &d)
				v.log.Info("qemu shutting down", "reason", d.Reason)
				if d.Guest && d.Reason == "guest-shutdown" {
					v.mu.Lock()
					v.guestOff = true
					v.mu.Unlock()
				}
			case "GUEST_PANICKED":
				v.log.Warn("guest panicked", "data", string(ev.Data))
				v.mu.Lock()
				first := v.runState != "guest-panicked"
				v.runState = "guest-panicked"
				var lastHB time.Time
				if v.guest != nil {
					lastHB = v.guest.LastHeartbeat
				}
				v.mu.Unlock()
				if first {
					v.agent.notifyIncident(v.spec.Name, hostproto.Incident{Kind: hostproto.IncidentPanic, DetectedAt: ev.Time.UTC(),
						Evidence: hostproto.Evidence{LastHeartbeat: lastHB, RunState: "guest-panicked", Detail: "QMP GUEST_PANICKED " + string(ev.Data), Console: v.consoleTail()}})
				}
			}
		}
	}
}

func (v *vm) setRunState(s string) {
	v.mu.Lock()
	changed := v.runState != s && v.proc != nil
	v.runState = s
	v.mu.Unlock()
	if changed {
		v.agent.notify(v.spec.Name, hostproto.EventRunState, true, s)
	}
}

// watchGuest keeps a connection to the guest agent's virtio-serial socket and
// records its heartbeats. QEMU accepts one client at a time; after an agent
// restart the new agent simply connects again.
func (v *vm) watchGuest(ctx context.Context, g *guestGate, linked chan struct{}) {
	var d net.Dialer
	var once sync.Once
	for v.waitArrived(ctx) {
		conn, err := d.DialContext(ctx, "unix", v.machine.AgentSocket())
		if err != nil {
			select {
			case <-ctx.Done():
				return
			case <-time.After(100 * time.Millisecond):
				continue
			}
		}
		stop := context.AfterFunc(ctx, func() { conn.Close() })
		v.mu.Lock()
		v.guestEnc = guestproto.NewEncoder(conn)
		v.mu.Unlock()
		// Said once the channel can be written to (askHeartbeat).
		once.Do(func() { close(linked) })
		v.readGuest(conn, g)
		v.mu.Lock()
		v.guestEnc = nil
		for id, ch := range v.pending {
			close(ch) // the guest channel is gone: waiting callers give up
			delete(v.pending, id)
		}
		v.mu.Unlock()
		stop()
		conn.Close()
	}
}

func (v *vm) readGuest(conn net.Conn, g *guestGate) {
	dec := guestproto.NewDecoder(conn)
	for {
		m, err := dec.Decode()
		if err != nil {
			if errors.Is(err, guestproto.ErrMalformed) {
				continue
			}
			return
		}
		if m.Type == guestproto.TypeExecResult || m.Type == guestproto.TypePong {
			v.mu.Lock()
			ch := v.pending[m.ID]
			delete(v.pending, m.ID)
			v.mu.Unlock()
			if ch != nil {
				ch <- m
			}
			continue
		}
		if m.Type != guestproto.TypeHeartbeat || m.Heartbeat == nil {
			continue
		}
		hb := m.Heartbeat
		now := time.Now()
		v.mu.Lock()
		ok, ignored := g.allow(now)
		if !ok {
			v.mu.Unlock()
			if ignored > 0 {
				v.log.Warn("guest agent exceeds its heartbeat rate: ignoring the excess", "ignored", ignored,
					"limit_per_second", g.lim.hbPerSecond, "next_warning_in", g.lim.warnEvery)
			}
			continue
		}
		gi := &api.GuestInfo{
			BootID: hb.BootID, Seq: hb.Seq, UptimeSeconds: hb.UptimeSeconds, Load1: hb.Load1,
			MemUsedBytes: hb.MemUsedBytes, LastHeartbeat: now.UTC(), Agent: agentVigil,
		}
		if old := v.guest; old != nil {
			// What qemu-ga told of this guest stays.
			gi.OS, gi.Hostname, gi.Addresses = old.OS, old.Hostname, old.Addresses
		}
		v.guest = gi
		v.agentSeen = true
		v.vigilAt = now
		report, later := g.boot(now, hb.BootID, hb.Seq)
		if later > 0 {
			// A boot change inside the window is reported when it ends,
			// with whatever boot the guest is on by then.
			g.timer = time.AfterFunc(later, func() { v.flushReady(g) })
		}
		v.mu.Unlock()
		if report {
			v.reportReady(hb.BootID, hb.Seq)
		}
	}
}

// flushReady reports the guest's latest boot at the end of a guest-ready
// window, unless it was reported already or the guest is gone.
func (v *vm) flushReady(g *guestGate) {
	v.mu.Lock()
	g.due = false
	if g.closed || v.guest == nil || g.reported && v.guest.BootID == g.readyBoot {
		v.mu.Unlock()
		return
	}
	id, seq := v.guest.BootID, g.bootSeq
	g.markReported(time.Now(), id)
	v.mu.Unlock()
	v.reportReady(id, seq)
}

func (v *vm) reportReady(bootID string, seq uint64) {
	v.log.Info("guest agent up", "boot_id", bootID, "seq", seq)
	b, _ := json.Marshal(struct {
		BootID string `json:"boot_id"`
		Seq    uint64 `json:"seq"`
	}{bootID, seq})
	v.agent.notify(v.spec.Name, hostproto.EventGuestReady, true, string(b))
}

// stop powers the VM down; see Agent.Stop.
func (v *vm) stop(ctx context.Context, force bool, timeout time.Duration) error {
	defer v.lockOp("stop")()
	v.mu.Lock()
	p, exited := v.proc, v.exited
	if p == nil {
		v.mu.Unlock()
		return fmt.Errorf("stop %s: %w", v.spec.Name, ErrNotRunning)
	}
	v.stopping = true
	v.mu.Unlock()

	if !force {
		if v.powerDown(ctx, p, exited, timeout) {
			return nil
		}
		if ctx.Err() != nil {
			return fmt.Errorf("stop %s: %w", v.spec.Name, ctx.Err())
		}
	}
	if err := p.Kill(ctx); err != nil {
		return err
	}
	select {
	case <-exited:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("stop %s: %w", v.spec.Name, ctx.Err())
	}
}

// powerDown asks the guest to power off and waits up to timeout for QEMU
// to exit: an ACPI power button press first and, if the guest ignores it
// for half the time or acpiGrace, whichever is shorter (no acpid or
// logind, an installer), qemu-guest-agent's guest-shutdown: a clean
// shutdown too, so asking for it while an ACPI one is slowly under way
// does no harm. It reports whether QEMU exited.
func (v *vm) powerDown(ctx context.Context, p *qemu.Process, exited <-chan struct{}, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	wait := func(d time.Duration) bool {
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-exited:
			return true
		case <-t.C:
		case <-ctx.Done():
		}
		return false
	}
	acpi := p.Monitor.SystemPowerdown(ctx)
	if acpi != nil {
		v.log.Warn("acpi power-down failed", "err", acpi)
	} else if wait(min(timeout/2, acpiGrace)) {
		return true
	}
	if ctx.Err() != nil {
		return false
	}
	if cl := v.qgaClient(); cl != nil {
		v.log.Info("guest ignored the acpi power button; asking qemu-guest-agent to shut it down")
		sctx, cancel := context.WithDeadline(ctx, deadline)
		err := cl.Shutdown(sctx, "powerdown")
		cancel()
		if err != nil {
			v.log.Warn("qemu-guest-agent shutdown failed", "err", err)
		}
	} else if acpi != nil {
		return false
	}
	if wait(time.Until(deadline)) {
		return true
	}
	v.log.Warn("guest did not power off in time; killing", "timeout", timeout)
	return false
}

// acpiGrace is the longest a stop waits for the guest to act on the ACPI
// power button before it also asks qemu-guest-agent.
const acpiGrace = 10 * time.Second

// waitArrived holds a watcher of the guest's channels while the VM is the
// destination of a live migration still under way, and reports whether
// the watch should go on (false once ctx ends): until the switchover there
// is no guest to talk to, and a connection would change the state of the
// virtio-serial ports while QEMU loads it from the stream.
func (v *vm) waitArrived(ctx context.Context) bool {
	for {
		v.mu.Lock()
		incoming := v.incoming
		v.mu.Unlock()
		if ctx.Err() != nil {
			return false
		}
		if !incoming {
			return true
		}
		select {
		case <-ctx.Done():
			return false
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// detach lets go of the process without touching it (agent shutdown).
func (v *vm) detach() {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.proc == nil {
		return
	}
	v.detached = true
	v.cancel()
	v.proc.Detach()
}
