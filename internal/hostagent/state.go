package hostagent

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/vigil-project/vigil/internal/hostproto"
	"github.com/vigil-project/vigil/internal/qemu"
	"github.com/vigil-project/vigil/internal/statefile"
)

// SaveResult describes a finished save of a VM's state.
type SaveResult = hostproto.SaveResult

func (v *vm) stateFile() string { return filepath.Join(v.storeDir, "state.vigil") }

func (v *vm) snapshotFile(snap string) string {
	return filepath.Join(v.storeDir, "snapshots", snap+".vigil")
}

func (v *vm) progress(verb string, done, total int64) {
	msg := fmt.Sprintf("%s %d MiB", verb, done>>20)
	if total > 0 {
		msg = fmt.Sprintf("%s %d%% (%d/%d MiB)", verb, done*100/total, done>>20, total>>20)
	}
	v.agent.notify(v.spec.Name, hostproto.EventProgress, true, msg)
}

func (v *vm) running() (*qemu.Process, string, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.proc == nil {
		return nil, "", fmt.Errorf("%s: %w", v.spec.Name, ErrNotRunning)
	}
	return v.proc, v.runState, nil
}

// Pause stops the guest's CPUs; its memory stays in QEMU.
func (a *Agent) Pause(ctx context.Context, r hostproto.VMRef) (hostproto.None, error) {
	name := r.VM
	v, err := a.get(name)
	if err != nil {
		return none(err)
	}
	defer v.lockOp("pause")()
	p, _, err := v.running()
	if err != nil {
		return none(err)
	}
	if err := p.Monitor.Stop(ctx); err != nil {
		return none(fmt.Errorf("pause %s: %w", name, err))
	}
	v.setRunState("paused")
	return hostproto.None{}, nil
}

// Resume continues a paused guest, or, when the VM has a saved state and no
// QEMU, starts QEMU from the state file and continues it.
func (a *Agent) Resume(ctx context.Context, r hostproto.VMRef) (hostproto.None, error) {
	name := r.VM
	v, err := a.get(name)
	if err != nil {
		return none(err)
	}
	defer v.lockOp("resume")()
	if p, _, err := v.running(); err == nil {
		v.setResync()
		if err := p.Monitor.Cont(ctx); err != nil {
			return none(fmt.Errorf("resume %s: %w", name, err))
		}
		// No heartbeat asked for here: the guest's record is still there
		// and its next heartbeat comes within an interval; asking would
		// only make work while the caller may pause it again.
		v.setRunState("running")
		return hostproto.None{}, nil
	}
	if _, err := os.Stat(v.stateFile()); err != nil {
		return none(fmt.Errorf("resume %s: no saved state and not running: %w", name, ErrNotRunning))
	}
	if err := v.startFromState(ctx, v.stateFile()); err != nil {
		return none(err)
	}
	// The disk has moved on from the saved instant: the file must never be
	// loaded again.
	os.Remove(v.stateFile())
	return hostproto.None{}, nil
}

// DiscardState deletes a saved state so the VM cold-boots from its disk.
func (a *Agent) DiscardState(_ context.Context, r hostproto.VMRef) (hostproto.None, error) {
	name := r.VM
	v, err := a.get(name)
	if err != nil {
		return none(err)
	}
	if err := os.Remove(v.stateFile()); err != nil && !os.IsNotExist(err) {
		return none(fmt.Errorf("discard state of %s: %w", name, err))
	}
	return hostproto.None{}, nil
}

// Suspend writes the full state of a running or paused VM to its state file
// and ends QEMU. A failed save leaves the VM as it was and no partial file.
func (a *Agent) Suspend(ctx context.Context, r hostproto.VMRef) (SaveResult, error) {
	name := r.VM
	v, err := a.get(name)
	if err != nil {
		return SaveResult{}, err
	}
	defer v.lockOp("suspend")()
	p, runState, err := v.running()
	if err != nil {
		return SaveResult{}, err
	}
	start := time.Now()
	w, err := v.createStateFile(v.stateFile(), statefile.KindSuspend)
	if err != nil {
		return SaveResult{}, fmt.Errorf("suspend %s: %w", name, err)
	}
	wasRunning := runState != "paused"
	if wasRunning {
		// Stopped first: one pass over memory, and the disk is quiet while
		// it is written, so the state and the disk are of one instant.
		if err := p.Monitor.Stop(ctx); err != nil {
			w.Abort()
			return SaveResult{}, fmt.Errorf("suspend %s: %w", name, err)
		}
	}
	restore := func() {
		if wasRunning {
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			p.Monitor.Cont(cctx)
			cancel()
		}
	}
	stats, err := qemu.SaveState(ctx, p.Monitor, v.machine.Dir, w, qemu.SaveOptions{
		Progress: func(n int64) { v.progress("saving state", n, v.spec.MemoryBytes) },
	})
	if err != nil {
		w.Abort()
		restore()
		return SaveResult{}, fmt.Errorf("suspend %s: %w", name, err)
	}
	info, err := w.Commit()
	if err != nil {
		restore()
		return SaveResult{}, fmt.Errorf("suspend %s: %w", name, err)
	}
	saved := time.Since(start) // the state is durable from here on
	v.log.Debug("suspend timings", "bytes", stats.Bytes, "migration_ms", stats.Total.Milliseconds(), "total_ms", saved.Milliseconds())
	// The state is safe on disk: end QEMU. Its exit is the one we asked for.
	v.mu.Lock()
	v.stopping = true
	exited := v.exited
	v.mu.Unlock()
	if err := p.Monitor.Quit(ctx); err != nil {
		p.Kill(ctx)
	}
	select {
	case <-exited:
	case <-time.After(10 * time.Second):
		p.Kill(ctx)
		<-exited
	}
	return SaveResult{Path: info.Path, Bytes: stats.Bytes, Duration: saved}, nil
}

func (v *vm) createStateFile(path, kind string) (*statefile.Writer, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, err
	}
	hw, _ := json.Marshal(v.machine.Hardware())
	return statefile.Create(path, statefile.Header{VM: v.spec.Name, Hardware: hw, QEMUVersion: v.agent.qemuVer(), Kind: kind})
}

// checkStateFile opens path and checks it fits this VM, without loading it.
func (v *vm) checkStateFile(path string) (*statefile.Reader, error) {
	r, err := statefile.Open(path)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadState, err)
	}
	var hw qemu.Hardware
	if err := json.Unmarshal(r.Info().Hardware, &hw); err != nil {
		r.Close()
		return nil, fmt.Errorf("%w: state file %s has an unreadable hardware definition: %v", ErrBadState, path, err)
	}
	if diff := hw.Diff(v.machine.Hardware()); len(diff) > 0 {
		r.Close()
		return nil, fmt.Errorf("%w: state file %s was saved on other hardware (saved vs now: %s)", ErrBadState, path, strings.Join(diff, "; "))
	}
	return r, nil
}

// guestLinkWait bounds how long a restored guest waits for the host to
// hold its channel before it runs.
const guestLinkWait = 2 * time.Second

// startFromState verifies path, starts QEMU waiting for it, feeds it and
// continues the guest. On failure no QEMU is left and path is untouched.
func (v *vm) startFromState(ctx context.Context, path string) error {
	if _, _, err := v.running(); err == nil {
		return fmt.Errorf("%s: %w", v.spec.Name, ErrRunning)
	}
	r, err := v.checkStateFile(path)
	if err != nil {
		return err
	}
	defer r.Close()
	total := r.Info().PayloadSize
	if err := r.Verify(func(done, total int64) { v.progress("verifying state", done, total) }); err != nil {
		return fmt.Errorf("%w: %w", ErrBadState, err)
	}
	m := v.machine
	m.Incoming = true
	// The guest's port is forwarded only once it runs: a connection slirp
	// accepted while the guest was still loading had its first packet to
	// the guest dropped, and waited for slirp's retransmission (seconds).
	fwd := len(v.spec.NICs) == 0 && v.spec.HostPort > 0
	m.NoHostFwd = fwd
	p, err := v.launch(ctx, m, false)
	if err != nil {
		return err
	}
	if err := qemu.LoadState(ctx, p.Monitor, m.Dir, r.Payload(), func(n int64) { v.progress("loading state", n, total) }); err != nil {
		kctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		p.Kill(kctx)
		cancel()
		p.Detach()
		return fmt.Errorf("%w: %w", ErrBadState, err)
	}
	// The guest's channel is held before the guest runs: what it sends at
	// once (a heartbeat) would otherwise go to a socket nobody holds yet,
	// and QEMU drops it; the next comes a heartbeat interval later.
	linked := v.attach(p)
	select {
	case <-linked:
	case <-time.After(guestLinkWait):
		v.log.Warn("the guest agent's channel was not connected before the guest runs: its first heartbeat may be lost", "wait", guestLinkWait)
	case <-ctx.Done():
	}
	v.setResync()
	if err := p.Monitor.Cont(ctx); err != nil {
		return fmt.Errorf("continue %s after loading its state: %w", v.spec.Name, err)
	}
	if fwd {
		// A QEMU just ended (a revert, a failover's old copy on this
		// machine) may hold the port a moment longer.
		var ferr error
		for i := 0; i < 50; i++ {
			if ferr = qemu.AddHostFwd(ctx, p.Monitor, v.spec.HostPort); ferr == nil {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		if ferr != nil {
			v.log.Error("the guest runs but its endpoint could not be forwarded", "port", v.spec.HostPort, "err", ferr)
		}
	}
	v.askHeartbeat()
	v.setRunState("running")
	v.log.Info("resumed from saved state", "file", path, "pid", p.PID)
	v.agent.notify(v.spec.Name, hostproto.EventStarted, true, fmt.Sprintf("pid %d, from saved state", p.PID))
	return nil
}
