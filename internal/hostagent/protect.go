package hostagent

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vigil-project/vigil/internal/ckptstream"
	"github.com/vigil-project/vigil/internal/hostproto"
	"github.com/vigil-project/vigil/internal/qcow2"
	"github.com/vigil-project/vigil/internal/qemu"
	"github.com/vigil-project/vigil/internal/qemu/qmp"
)

// Synchronized state, the primary's side: a protected VM that runs here is
// checkpointed to its secondary host every interval. A checkpoint is a live
// save whose guest stop (QEMU's pause-before-switchover) also takes an
// internal snapshot of the disk, so memory and disk are of one instant;
// the memory goes to the secondary over TLS (ckptstream), the disk stays
// in the storage pool both hosts mount. Once the secondary has committed
// checkpoint N, the disk snapshots of older checkpoints are deleted: the
// disk keeps exactly the one the secondary would resume from.

// checkpointPrefix names the internal disk snapshots of checkpoints; user
// snapshots may not use it (checkName).
const checkpointPrefix = ckptstream.DiskSnapshotPrefix

// Bounds of a protection's interval.
const (
	minCheckpointInterval = 50 * time.Millisecond
	maxCheckpointInterval = 10 * time.Minute
)

// checkpointQueueMiB bounds the memory a checkpoint may wait in on its way
// to the secondary (most of a small guest's checkpoint: QEMU then never
// waits for the network during the guest's stop).
const checkpointQueueMiB = 128

// ackTimeout bounds the wait for the secondary to commit a checkpoint it
// has received whole.
const ackTimeout = 30 * time.Second

// secondarySilence is how long the secondary may say nothing before the
// stream is called broken.
const secondarySilence = 3 * time.Second

// protection is one protected VM's checkpoint loop on its primary host.
type protection struct {
	req    hostproto.ProtectRequest
	cancel context.CancelFunc
	done   chan struct{}

	mu     sync.Mutex
	st     hostproto.ProtectionStatus
	pauses []time.Duration // the latest, oldest first
	seq    uint64
}

const keptPauses = 200

func (pr *protection) status() *hostproto.ProtectionStatus {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	st := pr.st
	return &st
}

func (pr *protection) update(f func(*hostproto.ProtectionStatus)) {
	pr.mu.Lock()
	f(&pr.st)
	pr.mu.Unlock()
}

func (pr *protection) heard() {
	pr.update(func(st *hostproto.ProtectionStatus) { st.SecondaryHeardAt = time.Now().UTC() })
}

func (pr *protection) committed(seq uint64, bytes int64, paused, took time.Duration) {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	pr.pauses = append(pr.pauses, paused)
	if len(pr.pauses) > keptPauses {
		pr.pauses = pr.pauses[len(pr.pauses)-keptPauses:]
	}
	sorted := slices.Clone(pr.pauses)
	slices.Sort(sorted)
	pct := func(q float64) float64 {
		i := int(q*float64(len(sorted)-1) + 0.5)
		return float64(sorted[i].Microseconds()) / 1000
	}
	pr.st.State, pr.st.Error = "protected", ""
	pr.st.Seq, pr.st.CommittedAt = seq, time.Now().UTC()
	pr.st.Checkpoints++
	pr.st.PauseP50MS, pr.st.PauseP99MS = pct(0.5), pct(0.99)
	pr.st.Bytes, pr.st.TookMS = bytes, float64(took.Microseconds())/1000
}

// Protect starts (or keeps) sending checkpoints of a VM of this host to
// its secondary. A request equal to the one in force changes nothing, so
// the manager can repeat it.
func (a *Agent) Protect(ctx context.Context, req hostproto.ProtectRequest) (hostproto.None, error) {
	if err := checkName("vm", req.VM); err != nil {
		return none(err)
	}
	if err := checkName("host", req.Secondary); err != nil {
		return none(err)
	}
	if req.Secondary == a.cfg.Name {
		return none(fmt.Errorf("%w: protect %s: its secondary must be another host than its primary %s", ErrInvalid, req.VM, a.cfg.Name))
	}
	if _, _, err := net.SplitHostPort(req.Addr); err != nil {
		return none(fmt.Errorf("%w: protect %s: secondary address %q is not host:port", ErrInvalid, req.VM, req.Addr))
	}
	iv := time.Duration(req.IntervalMS) * time.Millisecond
	if iv < minCheckpointInterval || iv > maxCheckpointInterval {
		return none(fmt.Errorf("%w: protect %s: interval %s is outside %s..%s", ErrInvalid, req.VM, iv, minCheckpointInterval, maxCheckpointInterval))
	}
	if req.Generation < 1 {
		return none(fmt.Errorf("%w: protect %s: generation %d", ErrInvalid, req.VM, req.Generation))
	}
	if a.cfg.PeerTLS == nil {
		return none(fmt.Errorf("%w: protect %s: this host has no certificate, and checkpoints go over TLS only", ErrInvalid, req.VM))
	}
	v, err := a.get(req.VM)
	if err != nil {
		return none(err)
	}
	if !v.pooled() {
		return none(fmt.Errorf("%w: protect %s: its disk is on this host's local storage; a secondary needs it in a storage pool", ErrInvalid, req.VM))
	}
	// One change of protection at a time: two loops on one VM would
	// release each other's held output.
	a.protectMu.Lock()
	defer a.protectMu.Unlock()
	a.mu.Lock()
	old := a.protections[req.VM]
	if old != nil && old.req == req {
		a.mu.Unlock()
		return hostproto.None{}, nil
	}
	a.mu.Unlock()
	if old != nil {
		a.stopProtection(req.VM, old)
	}
	pctx, cancel := context.WithCancel(context.Background())
	pr := &protection{req: req, cancel: cancel, done: make(chan struct{}), seq: uint64(time.Now().UnixMilli())}
	pr.st = hostproto.ProtectionStatus{Secondary: req.Secondary, Generation: req.Generation, State: "syncing"}
	a.mu.Lock()
	if a.protections == nil {
		a.protections = map[string]*protection{}
	}
	a.protections[req.VM] = pr
	a.mu.Unlock()
	a.wg.Go(func() {
		defer close(pr.done)
		a.protectLoop(pctx, pr)
	})
	v.log.Info("protection started", "secondary", req.Secondary, "interval", iv, "generation", req.Generation)
	return hostproto.None{}, nil
}

// Unprotect stops sending checkpoints of a VM and deletes their disk
// snapshots (if its QEMU runs; otherwise they go at its next protection).
func (a *Agent) Unprotect(ctx context.Context, r hostproto.VMRef) (hostproto.None, error) {
	if err := checkName("vm", r.VM); err != nil {
		return none(err)
	}
	a.protectMu.Lock()
	defer a.protectMu.Unlock()
	a.mu.Lock()
	pr := a.protections[r.VM]
	a.mu.Unlock()
	if pr != nil {
		a.stopProtection(r.VM, pr)
	}
	// Also without a loop here (an agent restarted since): a QEMU may
	// still hold output and checkpoints' disk snapshots.
	if v, err := a.get(r.VM); err == nil {
		if p, _, err := v.running(); err == nil {
			if err := v.endCheckpoints(p); err != nil {
				return none(fmt.Errorf("unprotect %s: %w", r.VM, err))
			}
		}
	}
	return hostproto.None{}, nil
}

// stopProtection ends pr's loop and forgets it.
func (a *Agent) stopProtection(vm string, pr *protection) {
	pr.cancel()
	<-pr.done
	a.mu.Lock()
	if a.protections[vm] == pr {
		delete(a.protections, vm)
	}
	a.mu.Unlock()
}

// stopProtections ends every loop (the agent is stopping).
func (a *Agent) stopProtections() {
	a.mu.Lock()
	prs := map[string]*protection{}
	for k, v := range a.protections {
		prs[k] = v
	}
	a.mu.Unlock()
	for vm, pr := range prs {
		a.stopProtection(vm, pr)
	}
}

func (a *Agent) protectionStatus(vm string) *hostproto.ProtectionStatus {
	a.mu.Lock()
	pr := a.protections[vm]
	a.mu.Unlock()
	if pr == nil {
		return nil
	}
	return pr.status()
}

// protectLoop runs checkpoint streams until ctx ends, starting a new one
// after each failure.
func (a *Agent) protectLoop(ctx context.Context, pr *protection) {
	for ctx.Err() == nil {
		err := a.protectSession(ctx, pr)
		if ctx.Err() != nil {
			return
		}
		if errors.Is(err, errGone) {
			a.log.Info("protection ended: the vm is no longer on this host", "vm", pr.req.VM)
			a.mu.Lock()
			if a.protections[pr.req.VM] == pr {
				delete(a.protections, pr.req.VM)
			}
			a.mu.Unlock()
			return
		}
		if err != nil {
			pr.update(func(st *hostproto.ProtectionStatus) { st.State, st.Error = "broken", err.Error() })
			a.log.Warn("checkpoint stream ended; starting a new one", "vm", pr.req.VM, "secondary", pr.req.Secondary, "err", err)
		}
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}

// errGone ends the protection of a VM no longer on this host (deleted,
// or taken by another host after a failover).
var errGone = errors.New("the vm is no longer on this host")

// errNotRunning ends a stream whose VM's QEMU is gone or was replaced.
var errNotRunning = errors.New("the vm's qemu is not the one the stream began with")

// protectSession is one checkpoint stream, for one run of the VM's QEMU.
func (a *Agent) protectSession(ctx context.Context, pr *protection) error {
	req := pr.req
	v, p, run, err := a.waitRunning(ctx, pr)
	if err != nil {
		return err
	}
	pr.update(func(st *hostproto.ProtectionStatus) {
		if st.Run != run {
			st.State, st.Run = "syncing", run
		}
	})
	client := hostproto.NewClient("https://"+req.Addr, &http.Client{Transport: &http.Transport{
		TLSClientConfig: a.cfg.PeerTLS(req.Secondary), TLSHandshakeTimeout: 10 * time.Second}}, nil)
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	conn, err := hostproto.Checkpoints.Open(dctx, client, hostproto.CheckpointsRequest{VM: req.VM})
	cancel()
	if err != nil {
		return fmt.Errorf("open the checkpoint stream to %s: %w", req.Secondary, err)
	}
	sctx, stop := context.WithCancel(ctx)
	defer stop()
	go func() { <-sctx.Done(); conn.Close() }()
	// Output held by a stream that ended (or an agent that died) goes now
	// (with no secondary taking checkpoints it would wait forever), but
	// only once no checkpoint older than it can be resumed.
	if err := v.endCheckpoints(p); err != nil {
		return err
	}
	defer func() {
		if err := v.endCheckpoints(p); err != nil {
			a.log.Error("a checkpoint stream ended, but its checkpoints could not be made unusable: the guest's output stays held", "vm", req.VM, "err", err)
		}
	}()
	c := ckptstream.NewConn(conn)
	if err := c.WriteJSON(ckptstream.TypeHello, ckptstream.Hello{VM: req.VM, Generation: req.Generation, Run: run}); err != nil {
		return err
	}
	pr.heard()

	acks := make(chan uint64, 4)
	readErr := make(chan error, 1)
	go func() {
		for {
			t, b, err := c.ReadFrame()
			if err != nil {
				readErr <- fmt.Errorf("secondary %s: %w", req.Secondary, err)
				return
			}
			pr.heard()
			switch t {
			case ckptstream.TypeAck:
				var ack ckptstream.Ack
				if err := ckptstream.DecodeJSON(b, &ack); err != nil {
					readErr <- err
					return
				}
				select {
				case acks <- ack.Seq:
				default:
				}
			case ckptstream.TypeError:
				var m ckptstream.ErrorMsg
				ckptstream.DecodeJSON(b, &m)
				readErr <- fmt.Errorf("secondary %s refused: %s", req.Secondary, m.Error)
				return
			}
		}
	}()
	go func() {
		t := time.NewTicker(ckptstream.PingEvery)
		defer t.Stop()
		for {
			select {
			case <-sctx.Done():
				return
			case <-t.C:
				// A secondary that says nothing (it pings while it takes
				// a checkpoint too) is gone: end the stream even in the
				// middle of a checkpoint, whose writes may block for long.
				if time.Since(pr.status().SecondaryHeardAt) > secondarySilence {
					stop()
					return
				}
				if c.IdleFor() >= ckptstream.PingEvery && c.WriteFrame(ckptstream.TypePing, nil) != nil {
					stop()
					return
				}
			}
		}
	}()

	interval := time.Duration(req.IntervalMS) * time.Millisecond
	next := time.Now()
	tick := time.NewTimer(0)
	defer tick.Stop()
	for {
		tick.Reset(time.Until(next))
		select {
		case <-sctx.Done():
			return fmt.Errorf("checkpoint stream to %s: %w", req.Secondary, context.Cause(sctx))
		case err := <-readErr:
			return err
		case <-tick.C:
		}
		if heard := pr.status().SecondaryHeardAt; time.Since(heard) > secondarySilence {
			return fmt.Errorf("secondary %s went silent", req.Secondary)
		}
		start := time.Now()
		cur, runState, err := v.running()
		if err != nil || cur != p {
			return errNotRunning
		}
		if runState != "running" {
			// A paused guest does not change; its last checkpoint holds.
			next = start.Add(interval)
			continue
		}
		pr.mu.Lock()
		pr.seq++
		seq := pr.seq
		pr.mu.Unlock()
		res, err := v.checkpoint(sctx, p, c, seq)
		if errors.Is(err, errNotRunning) {
			return err
		}
		if err != nil {
			return err
		}
		select {
		case got := <-acks:
			if got != seq {
				return fmt.Errorf("secondary %s acknowledged another checkpoint than the last", req.Secondary)
			}
		case err := <-readErr:
			return err
		case <-time.After(ackTimeout):
			return fmt.Errorf("secondary %s did not commit a checkpoint within %s", req.Secondary, ackTimeout)
		case <-sctx.Done():
			return sctx.Err()
		}
		// What the guest sent before this checkpoint's switchover is
		// state the secondary has now: let it out.
		v.releaseOutput(p, seq)
		pr.committed(seq, res.bytes, res.paused, time.Since(start))
		// The secondary resumes from this one now: older disk snapshots
		// are of no use.
		func() {
			defer v.lockOp("checkpoint-cleanup")()
			if cur, _, err := v.running(); err == nil && cur == p {
				if err := v.dropCheckpointSnapshots(sctx, p, checkpointSnapshot(seq)); err != nil {
					v.log.Warn("delete older checkpoints' disk snapshots", "err", err)
				}
			}
		}()
		next = start.Add(interval)
		if soonest := time.Now().Add(interval / 4); next.Before(soonest) {
			next = soonest // the guest gets some time between back-to-back checkpoints
		}
	}
}

// waitRunning waits until the protected VM has a QEMU here and names that
// run.
func (a *Agent) waitRunning(ctx context.Context, pr *protection) (*vm, *qemu.Process, string, error) {
	for {
		v, err := a.get(pr.req.VM)
		if errors.Is(err, ErrUnknownVM) {
			return nil, nil, "", errGone
		}
		if err == nil {
			if p, _, err := v.running(); err == nil {
				v.mu.Lock()
				run := strconv.Itoa(p.PID) + "-" + strconv.FormatInt(v.startedAt.UnixNano(), 10)
				v.mu.Unlock()
				return v, p, run, nil
			}
		}
		pr.update(func(st *hostproto.ProtectionStatus) {
			st.State, st.Error = "syncing", "the vm does not run here"
		})
		select {
		case <-ctx.Done():
			return nil, nil, "", ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func checkpointSnapshot(seq uint64) string { return checkpointPrefix + strconv.FormatUint(seq, 10) }

type checkpointResult struct {
	bytes  int64
	paused time.Duration
}

// checkpoint sends one checkpoint of the running guest on c: a live save
// whose switchover takes the disk snapshot.
func (v *vm) checkpoint(ctx context.Context, p *qemu.Process, c *ckptstream.Conn, seq uint64) (checkpointResult, error) {
	defer v.lockOp("checkpoint")()
	cur, runState, err := v.running()
	if err != nil || cur != p {
		return checkpointResult{}, errNotRunning
	}
	if runState != "running" {
		return checkpointResult{}, errNotRunning
	}
	name, snap := v.spec.Name, checkpointSnapshot(seq)
	events, unsubscribe := p.Monitor.Subscribe()
	defer unsubscribe()
	hw, _ := json.Marshal(v.machine.Hardware())
	if err := c.WriteJSON(ckptstream.TypeBegin, ckptstream.Begin{Seq: seq, DiskSnapshot: snap, Hardware: hw, QEMUVersion: v.agent.qemuVer()}); err != nil {
		return checkpointResult{}, err
	}
	if !qemu.LivePrecopySafe(v.machine) {
		// See liveSnapshot: this VM's memory cannot be copied while it runs.
		if err := p.Monitor.Stop(ctx); err != nil {
			return checkpointResult{}, fmt.Errorf("checkpoint %d of %s: stop the guest: %w", seq, name, err)
		}
	}
	tookDisk := false
	dw := c.AsyncData(checkpointQueueMiB)
	_, err = qemu.SaveState(ctx, p.Monitor, v.machine.Dir, dw, qemu.SaveOptions{
		AtSwitchover: func(ctx context.Context) error {
			// The guest is stopped: QEMU alone gets the CPU, and the two
			// steps go out together (QMP answers them in turn).
			dw.Hold()
			held := make(chan error, 1)
			// Packets from here on belong to the next checkpoint.
			go func() { held <- qemu.HoldOutput(ctx, p.Monitor, v.machine.Netdevs(), seq) }()
			err := p.Monitor.Run(ctx, "blockdev-snapshot-internal-sync", map[string]any{"device": "disk0", "name": snap}, nil)
			tookDisk = err == nil
			return errors.Join(err, <-held)
		},
	})
	if cerr := p.Monitor.Cont(context.WithoutCancel(ctx)); cerr != nil {
		// The stop was not reported (see watchQMP): say what QEMU is in.
		if st, qerr := p.Monitor.QueryStatus(context.WithoutCancel(ctx)); qerr == nil && !st.Running {
			v.setRunState(st.Status)
		}
		if err == nil {
			err = cerr
		}
	}
	dw.Release()
	// The guest runs again; the rest of its memory goes out from the queue.
	if serr := dw.Close(); serr != nil && err == nil {
		err = serr
	}
	if err != nil {
		c.WriteFrame(ckptstream.TypeAbort, nil)
		if tookDisk {
			p.Monitor.Run(context.WithoutCancel(ctx), "blockdev-snapshot-delete-internal-sync", map[string]any{"device": "disk0", "name": snap}, nil)
		}
		return checkpointResult{}, fmt.Errorf("checkpoint %d of %s: %w", seq, name, err)
	}
	if err := c.WriteJSON(ckptstream.TypeEnd, ckptstream.End{Seq: seq, Size: dw.Written()}); err != nil {
		return checkpointResult{}, err
	}
	return checkpointResult{bytes: dw.Written(), paused: pausedFor(events, true)}, nil
}

// endCheckpoints makes every checkpoint of the running guest p unusable
// (their disk snapshots go, so a standby of them cannot be activated) and
// only then lets out all the output held for them: output the secondary
// never committed is never seen from a state a failover could resume.
// Nothing to do if p is no longer the VM's QEMU (its held output died
// with it).
func (v *vm) endCheckpoints(p *qemu.Process) error {
	defer v.lockOp("checkpoint-cleanup")()
	if cur, _, err := v.running(); err != nil || cur != p {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := v.dropCheckpointSnapshots(ctx, p, ""); err != nil {
		return err
	}
	v.releaseOutput(p, 0)
	return nil
}

// releaseOutput lets out the guest's packets held for checkpoints before
// seq (all of them with seq 0).
func (v *vm) releaseOutput(p *qemu.Process, seq uint64) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := qemu.ReleaseOutput(ctx, p.Monitor, seq); err != nil {
		v.log.Warn("release held output", "err", err)
	}
}

// dropCheckpointSnapshots deletes the disk snapshots of checkpoints but
// keep (all of them when keep is ""). The caller holds opMu.
func (v *vm) dropCheckpointSnapshots(ctx context.Context, p *qemu.Process, keep string) error {
	names, err := internalSnapshots(ctx, p.Monitor)
	if err != nil {
		return fmt.Errorf("list the disk's snapshots: %w", err)
	}
	var errs []error
	for _, n := range names {
		if !strings.HasPrefix(n, checkpointPrefix) || n == keep {
			continue
		}
		if err := p.Monitor.Run(ctx, "blockdev-snapshot-delete-internal-sync", map[string]any{"device": "disk0", "name": n}, nil); err != nil {
			errs = append(errs, fmt.Errorf("delete the disk snapshot of checkpoint %s: %w", n, err))
		}
	}
	return errors.Join(errs...)
}

// dropCheckpointSnapshotsOffline is dropCheckpointSnapshots for a disk no
// QEMU has open: before a launch that is not from a checkpoint, so that a
// checkpoint of an earlier run of the VM can never be resumed.
func (v *vm) dropCheckpointSnapshotsOffline(ctx context.Context) error {
	names, err := qcow2.SnapshotNames(v.machine.Disk)
	if err != nil {
		// Not an image Vigil made (its parser is strict): such a disk
		// never had a checkpoint's snapshot, which Vigil would have made.
		v.log.Warn("cannot list the disk's snapshots to drop old checkpoints", "err", err)
		return nil
	}
	for _, n := range names {
		if strings.HasPrefix(n, checkpointPrefix) {
			if err := qemu.DiskSnapshot(ctx, v.machine.Disk, "delete", n); err != nil {
				return err
			}
		}
	}
	return nil
}

// internalSnapshots lists the internal snapshots of the disk node disk0.
func internalSnapshots(ctx context.Context, mon *qmp.Monitor) ([]string, error) {
	var nodes []struct {
		NodeName string `json:"node-name"`
		Image    struct {
			Snapshots []struct {
				Name string `json:"name"`
			} `json:"snapshots"`
		} `json:"image"`
	}
	if err := mon.Run(ctx, "query-named-block-nodes", map[string]any{"flat": true}, &nodes); err != nil {
		return nil, err
	}
	for _, n := range nodes {
		if n.NodeName == "disk0" {
			var out []string
			for _, s := range n.Image.Snapshots {
				out = append(out, s.Name)
			}
			return out, nil
		}
	}
	return nil, errors.New("no disk node disk0")
}

// peerTLS is Config.PeerTLS's type.
type peerTLS = func(host string) *tls.Config
