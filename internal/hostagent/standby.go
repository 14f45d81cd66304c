package hostagent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/vigil-project/vigil/internal/ckptstream"
	"github.com/vigil-project/vigil/internal/hostproto"
	"github.com/vigil-project/vigil/internal/qemu"
)

// Synchronized state, the secondary's side: this host keeps the last
// committed checkpoint of a VM that runs on another host (its primary) and
// does not run the guest. Only the primary the manager named may send
// checkpoints, authenticated by its host certificate. The standby becomes
// the VM only when the manager, having declared the primary's host dead
// (which has fenced itself by then), attaches the VM here and activates it.

// standbyExpiry is how long a standby that no primary streams to is kept.
// A failover comes seconds after a primary's death, and a primary cut off
// from the managers fences its VM within seconds: a standby idle this long
// is of a pairing that ended while this host could not be told (it was
// down, or declared dead).
const standbyExpiry = 10 * time.Minute

// standby is one VM whose checkpoints this host keeps.
type standby struct {
	req hostproto.StandbyRequest
	dir string

	mu sync.Mutex
	// heardAt is when the primary last sent something (or the standby was
	// made).
	heardAt time.Time
	// stream is the current checkpoint stream (nil when none); done is
	// closed when it ends.
	stream io.Closer
	done   chan struct{}
	closed bool // activated or dropped: take no more streams
}

// checkpointLimit bounds a checkpoint of a guest of mem bytes: its memory
// and its devices' state (0: the manager did not say).
func checkpointLimit(mem int64) int64 {
	if mem <= 0 {
		return 0
	}
	return mem + mem/2 + 256<<20
}

func (a *Agent) standbyDir(vm string) string { return filepath.Join(a.cfg.DataDir, "standby", vm) }

// Standby makes this host keep VM's standby for req.Primary. Repeating it
// keeps what was received; a new generation replaces the old standby.
func (a *Agent) Standby(ctx context.Context, req hostproto.StandbyRequest) (hostproto.None, error) {
	if err := checkName("vm", req.VM); err != nil {
		return none(err)
	}
	if err := checkName("host", req.Primary); err != nil {
		return none(err)
	}
	if req.Primary == a.cfg.Name {
		return none(fmt.Errorf("%w: standby of %s: this host is its primary", ErrInvalid, req.VM))
	}
	if req.Generation < 1 {
		return none(fmt.Errorf("%w: standby of %s: generation %d", ErrInvalid, req.VM, req.Generation))
	}
	if v, err := a.get(req.VM); err == nil {
		if _, _, err := v.running(); err == nil {
			return none(fmt.Errorf("standby of %s: %w: the vm runs on this host", req.VM, ErrRunning))
		}
	}
	a.mu.Lock()
	old := a.standbys[req.VM]
	if old != nil && old.req == req {
		a.mu.Unlock()
		return hostproto.None{}, nil
	}
	sb := &standby{req: req, dir: a.standbyDir(req.VM), heardAt: time.Now()}
	if a.standbys == nil {
		a.standbys = map[string]*standby{}
	}
	a.standbys[req.VM] = sb
	a.mu.Unlock()
	if old != nil {
		old.close()
	}
	if err := os.MkdirAll(sb.dir, 0o700); err != nil {
		return none(fmt.Errorf("standby of %s: %w", req.VM, err))
	}
	// A checkpoint of another generation (another pairing) is stale.
	if info, err := ckptstream.Committed(sb.dir); err == nil && info.Checkpoint.Generation != req.Generation {
		os.Remove(filepath.Join(sb.dir, ckptstream.CommittedFile))
	}
	a.log.Info("keeping a standby", "vm", req.VM, "primary", req.Primary, "generation", req.Generation)
	return hostproto.None{}, nil
}

// StandbyDrop forgets VM's standby and its checkpoint.
func (a *Agent) StandbyDrop(ctx context.Context, r hostproto.VMRef) (hostproto.None, error) {
	if err := checkName("vm", r.VM); err != nil {
		return none(err)
	}
	a.mu.Lock()
	sb := a.standbys[r.VM]
	delete(a.standbys, r.VM)
	a.mu.Unlock()
	if sb != nil {
		sb.close()
	}
	os.RemoveAll(a.standbyDir(r.VM))
	return hostproto.None{}, nil
}

// close ends the standby's stream (waiting for it) and takes no more.
func (sb *standby) close() {
	sb.mu.Lock()
	sb.closed = true
	s, done := sb.stream, sb.done
	sb.mu.Unlock()
	if s != nil {
		s.Close()
		<-done
	}
}

// Checkpoints takes the checkpoint stream of a VM from its primary. Only
// the host the manager named as the primary may open it.
func (a *Agent) Checkpoints(ctx context.Context, r hostproto.CheckpointsRequest) (io.ReadWriteCloser, error) {
	peer := hostproto.PeerHost(ctx)
	if peer == "" {
		return nil, fmt.Errorf("%w: checkpoints come from the primary host only", ErrInvalid)
	}
	if err := checkName("vm", r.VM); err != nil {
		return nil, err
	}
	a.mu.Lock()
	sb := a.standbys[r.VM]
	a.mu.Unlock()
	if sb == nil || sb.req.Primary != peer {
		return nil, fmt.Errorf("%w: this host keeps no standby of %s for host %s", ErrInvalid, r.VM, peer)
	}
	ours, theirs := net.Pipe()
	sb.mu.Lock()
	if sb.closed {
		sb.mu.Unlock()
		return nil, fmt.Errorf("%w: the standby of %s is being activated or dropped", ErrInvalid, r.VM)
	}
	old, oldDone := sb.stream, sb.done
	done := make(chan struct{})
	sb.stream, sb.done = ours, done
	sb.mu.Unlock()
	if old != nil {
		old.Close()
		<-oldDone
	}
	rc := &ckptstream.Receiver{Dir: sb.dir, VM: r.VM, Generation: sb.req.Generation, MaxBytes: checkpointLimit(sb.req.MemoryBytes),
		Heard: func() {
			sb.mu.Lock()
			sb.heardAt = time.Now()
			sb.mu.Unlock()
		}}
	go func() {
		defer close(done)
		defer ours.Close()
		err := rc.Serve(context.Background(), ckptstream.NewConn(ours))
		sb.mu.Lock()
		if sb.stream == ours {
			sb.stream = nil
		}
		sb.mu.Unlock()
		if err != nil && !errors.Is(err, io.ErrClosedPipe) {
			a.log.Info("checkpoint stream ended", "vm", r.VM, "from", peer, "err", err)
		}
	}()
	return theirs, nil
}

// Activate runs an attached VM from its standby's last committed
// checkpoint: the disk goes back to the checkpoint's snapshot (writes the
// primary made after it belong to state that was never committed), then
// the guest's memory is loaded and it continues.
func (a *Agent) Activate(ctx context.Context, r hostproto.ActivateRequest) (hostproto.ActivateResult, error) {
	start := time.Now()
	if err := checkName("vm", r.VM); err != nil {
		return hostproto.ActivateResult{}, err
	}
	v, err := a.get(r.VM)
	if err != nil {
		return hostproto.ActivateResult{}, fmt.Errorf("activate %s: attach it first: %w", r.VM, err)
	}
	a.mu.Lock()
	sb := a.standbys[r.VM]
	a.mu.Unlock()
	dir := a.standbyDir(r.VM)
	if sb != nil {
		sb.close() // no checkpoint may commit while the guest starts
	}
	info, err := ckptstream.Committed(dir)
	if err != nil {
		return hostproto.ActivateResult{}, fmt.Errorf("activate %s: %w: no committed checkpoint here: %v", r.VM, ErrBadState, err)
	}
	ck := info.Checkpoint
	if r.Run != "" && ck.Run != r.Run {
		return hostproto.ActivateResult{}, fmt.Errorf("activate %s: %w: the checkpoint here is of run %s of its qemu, the primary last ran %s", r.VM, ErrBadState, ck.Run, r.Run)
	}
	defer v.lockOp("activate")()
	if err := v.checkOwner(); err != nil {
		return hostproto.ActivateResult{}, fmt.Errorf("activate %s: %w", r.VM, err)
	}
	if err := v.mayLaunch(v.machine, false); err != nil {
		return hostproto.ActivateResult{}, fmt.Errorf("activate %s: %w", r.VM, err)
	}
	if err := qemu.DiskSnapshot(ctx, v.machine.Disk, "apply", ck.DiskSnapshot); err != nil {
		return hostproto.ActivateResult{}, fmt.Errorf("activate %s: %w: the disk has no snapshot of checkpoint %d: %v", r.VM, ErrBadState, ck.Seq, err)
	}
	os.Remove(v.stateFile()) // a suspend's state is older than the checkpoint
	if err := v.startFromState(ctx, info.Path); err != nil {
		return hostproto.ActivateResult{}, fmt.Errorf("activate %s from checkpoint %d: %w", r.VM, ck.Seq, err)
	}
	res := hostproto.ActivateResult{Seq: ck.Seq, TakenAt: info.CreatedAt, Bytes: info.PayloadSize, TookMS: float64(time.Since(start).Microseconds()) / 1000}
	v.log.Info("activated the standby", "checkpoint", ck.Seq, "taken_at", info.CreatedAt, "took", time.Since(start))
	a.mu.Lock()
	if a.standbys[r.VM] == sb {
		delete(a.standbys, r.VM)
	}
	a.mu.Unlock()
	os.RemoveAll(dir)
	return res, nil
}

// expireStandbys drops, every minute until ctx ends, the standbys no
// primary has streamed to for standbyExpiry, and the standby directories
// a previous agent left that nobody claimed again within that time.
func (a *Agent) expireStandbys(ctx context.Context) {
	t := time.NewTicker(time.Minute)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		a.expireStandbysNow(time.Now())
	}
}

func (a *Agent) expireStandbysNow(now time.Time) {
	a.mu.Lock()
	var stale []*standby
	for vm, sb := range a.standbys {
		sb.mu.Lock()
		idle := sb.stream == nil && now.Sub(sb.heardAt) > standbyExpiry
		sb.mu.Unlock()
		if idle {
			stale = append(stale, sb)
			delete(a.standbys, vm)
		}
	}
	known := map[string]bool{}
	for vm := range a.standbys {
		known[vm] = true
	}
	a.mu.Unlock()
	for _, sb := range stale {
		a.log.Info("dropping a standby no primary streamed to", "vm", sb.req.VM, "primary", sb.req.Primary, "idle_for", standbyExpiry)
		sb.close()
		os.RemoveAll(sb.dir)
	}
	ents, _ := os.ReadDir(filepath.Join(a.cfg.DataDir, "standby"))
	for _, e := range ents {
		if known[e.Name()] {
			continue
		}
		if info, err := e.Info(); err == nil && now.Sub(info.ModTime()) > standbyExpiry {
			os.RemoveAll(filepath.Join(a.cfg.DataDir, "standby", e.Name()))
		}
	}
}
