package hostagent

import (
	"context"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/vigil-project/vigil/internal/hostproto"
	"github.com/vigil-project/vigil/internal/pki"
	"github.com/vigil-project/vigil/internal/qemu"
)

// Live migration between two host agents of one storage pool. The manager
// drives it:
//
//	uri := dst.MigrateIn(spec with epoch+1)  // QEMU waits for the stream
//	src.MigrateOut(name, uri)                // stream, switch over, quit
//	dst.MigrateFinish(name)                  // guest runs; lease and port move
//
// The lease (owner file) moves at the end, so until then the source's copy
// stays the VM's; if anything fails before the switchover the source keeps
// running and MigrateAbort removes the destination's QEMU.

// MigrateIn starts a QEMU for req.Spec waiting for a live migration from
// host req.Source (over TLS: only that host's certificate is admitted) and
// returns the port it listens on.
func (a *Agent) MigrateIn(ctx context.Context, req hostproto.MigrateInRequest) (hostproto.MigrateInResult, error) {
	spec := req.Spec
	if err := checkName("vm", spec.Name); err != nil {
		return hostproto.MigrateInResult{}, err
	}
	if err := checkName("host", req.Source); err != nil {
		return hostproto.MigrateInResult{}, err
	}
	if a.cfg.MigrationTLSDir == "" {
		return hostproto.MigrateInResult{}, fmt.Errorf("migrate %s here: %w: this host has no certificate, and migration streams go over TLS only", spec.Name, ErrInvalid)
	}
	if spec.Pool == "" || spec.Pool != a.poolID {
		return hostproto.MigrateInResult{}, fmt.Errorf("migrate %s here: %w (it is in %q, this host has %q)", spec.Name, ErrWrongPool, spec.Pool, a.poolID)
	}
	a.mu.Lock()
	if old, ok := a.vms[spec.Name]; ok {
		if _, _, err := old.running(); err == nil {
			a.mu.Unlock()
			return hostproto.MigrateInResult{}, fmt.Errorf("migrate %s here: %w", spec.Name, ErrRunning)
		}
	}
	v := a.newVM(spec)
	v.incoming = true
	a.vms[spec.Name] = v
	a.mu.Unlock()

	fail := func(err error) (hostproto.MigrateInResult, error) {
		a.dropLocal(v)
		return hostproto.MigrateInResult{}, fmt.Errorf("migrate %s here: %w", spec.Name, err)
	}
	if o, err := v.readOwner(); err != nil || o.Epoch >= spec.Epoch {
		return fail(fmt.Errorf("%w: the pool's owner file does not allow epoch %d (%+v, %v)", ErrNotOwner, spec.Epoch, o, err))
	}
	if err := os.MkdirAll(v.machine.Dir, 0o755); err != nil {
		return fail(err)
	}
	if err := v.writeSpec(); err != nil {
		return fail(err)
	}
	m := v.machine
	m.Incoming, m.NoHostFwd = true, true
	defer v.lockOp("migrate-in")()
	p, err := v.launch(ctx, m, true)
	if err != nil {
		return fail(err)
	}
	v.attach(p)
	tls := &qemu.MigrationTLS{Dir: a.cfg.MigrationTLSDir, Peer: qemu.SubjectDN(pki.RoleHost, req.Source)}
	uri, err := qemu.MigrateIncoming(ctx, p.Monitor, a.cfg.MigrationHost, tls)
	if err == nil {
		_, port, _ := net.SplitHostPort(strings.TrimPrefix(uri, "tcp:"))
		res := hostproto.MigrateInResult{}
		if res.Port, err = strconv.Atoi(port); err == nil {
			v.log.Info("waiting for a live migration", "uri", uri, "from", req.Source, "pid", p.PID)
			return res, nil
		}
	}
	kctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	v.killLocked(kctx, p)
	cancel()
	return fail(err)
}

// MigrateOut sends the running VM to uri (a destination's MigrateIn) and,
// once the guest runs there, ends the local QEMU. The local entry stays
// until the pool's owner file names the new host (Sweep drops it).
func (a *Agent) MigrateOut(ctx context.Context, r hostproto.MigrateOutRequest) (hostproto.Migration, error) {
	name := r.VM
	if err := checkName("host", r.Dest); err != nil {
		return hostproto.Migration{}, err
	}
	if net.ParseIP(r.Addr) == nil || r.Port < 1 || r.Port > 65535 {
		return hostproto.Migration{}, fmt.Errorf("%w: migrate %s: the destination must be an IP address and a port, not %q:%d", ErrInvalid, name, r.Addr, r.Port)
	}
	if a.cfg.MigrationTLSDir == "" {
		return hostproto.Migration{}, fmt.Errorf("%w: migrate %s: this host has no certificate, and migration streams go over TLS only", ErrInvalid, name)
	}
	uri := "tcp:" + net.JoinHostPort(r.Addr, strconv.Itoa(r.Port))
	v, err := a.get(name)
	if err != nil {
		return hostproto.Migration{}, err
	}
	defer v.lockOp("migrate-out")()
	p, _, err := v.running()
	if err != nil {
		return hostproto.Migration{}, err
	}
	st, err := qemu.MigrateOut(ctx, p.Monitor, uri, &qemu.MigrationTLS{Dir: a.cfg.MigrationTLSDir, Peer: r.Dest}, !qemu.LivePrecopySafe(v.machine))
	if err != nil {
		return hostproto.Migration{}, fmt.Errorf("migrate %s: %w", name, err)
	}
	stats := hostproto.Migration{Total: st.Total, Downtime: st.Downtime, Bytes: st.Bytes}
	v.log.Info("migrated out", "to", uri, "total", stats.Total, "downtime", stats.Downtime)
	// The guest runs on the destination now: this copy is paused for good
	// and must go, which also frees the forwarded port for the new host.
	v.mu.Lock()
	v.stopping = true
	exited := v.exited
	v.mu.Unlock()
	qctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if err := p.Monitor.Quit(qctx); err != nil {
		p.Kill(qctx)
	}
	select {
	case <-exited:
	case <-qctx.Done():
		p.Kill(context.Background())
	}
	return stats, nil
}

// MigrateFinish waits for the incoming guest to run, takes the lease and
// forwards the VM's port here.
func (a *Agent) MigrateFinish(ctx context.Context, r hostproto.VMRef) (hostproto.None, error) {
	name := r.VM
	v, err := a.get(name)
	if err != nil {
		return none(err)
	}
	defer v.lockOp("migrate-finish")()
	v.mu.Lock()
	incoming := v.incoming
	v.mu.Unlock()
	if !incoming {
		// Finished already (a manager that took over after a crash asks
		// again): the lease and the port are in place.
		if err := v.checkOwner(); err != nil {
			return none(fmt.Errorf("finish migration of %s: %w", name, err))
		}
		return hostproto.None{}, nil
	}
	p, _, err := v.running()
	if err != nil {
		return none(fmt.Errorf("finish migration of %s: %w", name, err))
	}
	werr := qemu.WaitIncoming(ctx, p.Monitor)
	// The source has handed over and quit before this call: from here this
	// host holds the VM, whatever state its guest is in, so that the VM can
	// at least be started again here.
	v.mu.Lock()
	epoch := v.spec.Epoch
	v.incoming = false
	v.mu.Unlock()
	if err := v.claim(epoch); err != nil {
		return none(fmt.Errorf("finish migration of %s: %w", name, err))
	}
	if werr != nil {
		kctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		v.killLocked(kctx, p)
		cancel()
		return none(fmt.Errorf("finish migration of %s: %w (its qemu here was ended; start the vm again)", name, werr))
	}
	// The source quit before this call, but its port may take a moment to
	// be released by the kernel.
	v.announce(p)
	var ferr error
	for i := 0; i < 50 && len(v.spec.NICs) == 0; i++ {
		if ferr = qemu.AddHostFwd(ctx, p.Monitor, v.spec.HostPort); ferr == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if ferr != nil {
		v.log.Warn("the guest runs here but its endpoint could not be forwarded", "port", v.spec.HostPort, "err", ferr)
	}
	v.setRunState("running")
	v.log.Info("migration finished: the vm runs here", "epoch", epoch)
	a.notify(name, hostproto.EventStarted, true, fmt.Sprintf("pid %d, by live migration", p.PID))
	return none(ferr)
}

// MigrateAbort ends an incoming migration that will not complete: its
// QEMU is killed and the local entry dropped. The pool is not touched.
func (a *Agent) MigrateAbort(ctx context.Context, r hostproto.VMRef) (hostproto.None, error) {
	name := r.VM
	v, err := a.get(name)
	if err != nil {
		return hostproto.None{}, nil
	}
	v.mu.Lock()
	incoming := v.incoming
	v.mu.Unlock()
	if !incoming {
		return none(fmt.Errorf("abort migration of %s: it is not migrating to this host", name))
	}
	defer v.lockOp("migrate-abort")()
	if p, _, err := v.running(); err == nil {
		// A destination that runs the guest has it: the migration
		// completed after all, and killing it would lose the VM.
		if st, err := p.Monitor.QueryStatus(ctx); err == nil && st.Status != "inmigrate" {
			return none(fmt.Errorf("abort migration of %s: the guest already runs here (%s): finish the migration instead", name, st.Status))
		}
		v.killLocked(ctx, p)
	}
	a.dropLocal(v)
	return hostproto.None{}, nil
}

// dropLocal forgets v and removes its run directory, unless another entry
// of the same name (a VM that came back meanwhile) has replaced it.
func (a *Agent) dropLocal(v *vm) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if cur, ok := a.vms[v.spec.Name]; ok && cur != v {
		return
	}
	delete(a.vms, v.spec.Name)
	os.RemoveAll(v.machine.Dir)
}
