// Package hostagent runs on every hypervisor host: it creates VM directories
// and disks, starts and supervises QEMU processes over QMP, listens to the
// guest agents, and re-adopts QEMU processes after the agent restarts.
package hostagent

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/hostnet"
	"github.com/vigil-project/vigil/internal/hostproto"
	"github.com/vigil-project/vigil/internal/imagestore"
	"github.com/vigil-project/vigil/internal/qemu"
)

// Image is the guest boot image every VM on this host starts from.
type Image struct {
	Kernel, Initrd, Cmdline string
}

// Config configures an Agent.
type Config struct {
	Name    string
	DataDir string // VM run directories (sockets, pid, spec) live under DataDir/vms
	// StoragePool, if set, is a directory every host of the pool mounts
	// (NFS, CephFS, or a shared directory on one machine): VM disks, saved
	// states and snapshots go there, so another host can take the VM over.
	StoragePool string
	// MigrationHost is the address incoming live migrations listen on
	// (default 127.0.0.1); it must be reachable from the other hosts.
	MigrationHost string
	// MigrationTLSDir holds the host's certificate, key and the cluster CA
	// as QEMU's tls-creds-x509 reads them; live migrations go over TLS
	// with them (a host without one neither sends nor takes migrations).
	MigrationTLSDir string
	Accel           string // auto, kvm or tcg
	// QEMUVersion, if set, is the QEMU binary's version as known already
	// (a host image records the QEMU it carries); else QEMU is asked.
	QEMUVersion string
	Image       Image
	Logger      *slog.Logger
	// Images fetches image blobs this host lacks (nil: none can be).
	Images ImageSource
	// PeerTLS, if set, is the client TLS configuration for reaching host
	// name (its certificate checked, this host's presented): checkpoints of
	// protected VMs go to their secondary host with it.
	PeerTLS func(name string) *tls.Config
	// Notify receives every host event. It is called from the agent's
	// goroutines and must not block for long.
	Notify func(hostproto.Event)
}

// Agent supervises the VMs of one host.
type Agent struct {
	cfg     Config
	accel   string
	qemuBin string
	// qemuVer is the QEMU binary's version, asked once, in the background
	// from New on (running QEMU costs a third of a second on a host that
	// has just booted under TCG).
	qemuVer func() string
	poolID  string
	cutOff  atomic.Bool // see SetCutOff
	log     *slog.Logger

	// guestLimits bound what each guest can make the agent do (zero: the
	// defaults; tests shorten them).
	guestLimits guestLimits
	// poolLocks checks the pool's locks while Run runs (see PoolLocks).
	poolLocks atomic.Pointer[lockCheck]
	// execGrace is how long past a command's timeout Exec waits (zero: the
	// default; tests shorten it).
	execGrace time.Duration
	// qgaTimings pace the watch of qemu-guest-agent (zero: the defaults).
	qgaTimings qgaTimings

	mu  sync.Mutex
	vms map[string]*vm
	// protections are the checkpoint loops of protected VMs running here;
	// standbys the VMs whose checkpoints this host keeps (guarded by mu).
	protections map[string]*protection
	standbys    map[string]*standby
	// protectMu serialises Protect and Unprotect.
	protectMu sync.Mutex
	// fetching serialises fetches of one image blob (guarded by mu).
	fetching map[string]*sync.Mutex

	// net wires VMs to networks (see hostNet).
	netOnce sync.Once
	net     *hostnet.Host
	netErr  error

	imagesOnce sync.Once
	images     *imagestore.Store
	imagesErr  error

	wg sync.WaitGroup // supervision goroutines
}

// New checks the host (QEMU present, accelerator usable) and loads the VMs
// recorded under the data dir; Run adopts the ones still running.
func New(cfg Config) (*Agent, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.MigrationHost == "" {
		cfg.MigrationHost = "127.0.0.1"
	}
	if cfg.Notify == nil {
		cfg.Notify = func(hostproto.Event) {}
	}
	accel, err := qemu.ChooseAccel(cfg.Accel)
	if err != nil {
		return nil, err
	}
	bin, err := qemu.FindBinary()
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Join(cfg.DataDir, "vms"), 0o755); err != nil {
		return nil, fmt.Errorf("create data dir: %w", err)
	}
	a := &Agent{cfg: cfg, accel: accel, qemuBin: bin, qemuVer: sync.OnceValue(func() string {
		if cfg.QEMUVersion != "" {
			return cfg.QEMUVersion
		}
		return qemu.BinaryVersion(bin)
	}), log: cfg.Logger.With("host", cfg.Name), vms: map[string]*vm{}}
	go a.qemuVer()
	if cfg.StoragePool != "" {
		if a.poolID, err = openPool(cfg.StoragePool); err != nil {
			return nil, err
		}
	}
	return a, nil
}

// Name is the host's name.
func (a *Agent) Name() string { return a.cfg.Name }

// Info describes the host's capacity (the host operation).
func (a *Agent) Info(context.Context, hostproto.None) (api.Host, error) { return a.HostInfo(), nil }

// HostInfo describes the host's capacity.
func (a *Agent) HostInfo() api.Host {
	a.mu.Lock()
	n := len(a.vms)
	a.mu.Unlock()
	return api.Host{
		Name:          a.cfg.Name,
		State:         "up",
		Accel:         a.accel,
		CPUs:          runtime.NumCPU(),
		MemoryBytes:   memTotal(),
		VMs:           n,
		QEMUVersion:   a.qemuVer(),
		LastHeartbeat: time.Now().UTC(),
		StoragePool:   a.poolID,
		PoolLocks:     a.PoolLocks(),
	}
}

// Recover loads the VMs recorded under the data dir and adopts every QEMU
// that survived the previous agent. Call it once, before the manager looks
// at this host, so that no surviving VM is mistaken for a crashed one.
func (a *Agent) Recover(ctx context.Context) error {
	return a.loadAndAdopt(ctx)
}

// Run supervises until ctx ends. On return QEMU processes are left running:
// stopping the agent never stops the VMs.
func (a *Agent) Run(ctx context.Context) error {
	a.wg.Go(func() { a.expireStandbys(ctx) })
	if a.poolID != "" {
		a.watchPool(ctx)
	}
	<-ctx.Done()
	a.stopProtections()
	a.mu.Lock()
	for _, v := range a.vms {
		v.detach()
	}
	a.mu.Unlock()
	a.wg.Wait()
	if a.net != nil {
		a.net.Close()
	}
	return nil
}

func (a *Agent) vmDir(name string) string { return filepath.Join(a.cfg.DataDir, "vms", name) }

// storeDir holds a VM's disk, saved state and snapshots: in the pool for a
// pooled VM, else next to its run files.
func (a *Agent) storeDir(spec hostproto.VMSpec) string {
	if spec.Pool != "" && a.cfg.StoragePool != "" {
		return filepath.Join(a.cfg.StoragePool, "vms", spec.Name)
	}
	return a.vmDir(spec.Name)
}

// loadAndAdopt reads each VM's spec.json and reconnects to live QEMUs,
// then fences every QEMU of this data dir it could not adopt.
func (a *Agent) loadAndAdopt(ctx context.Context) error {
	ents, err := os.ReadDir(filepath.Join(a.cfg.DataDir, "vms"))
	if err != nil {
		return fmt.Errorf("list vms: %w", err)
	}
	// why each VM directory is not managed, for fenceUnadopted
	unmanaged := map[string]string{}
	for _, e := range ents {
		if !e.IsDir() {
			continue
		}
		var spec hostproto.VMSpec
		b, err := os.ReadFile(filepath.Join(a.vmDir(e.Name()), "spec.json"))
		if err != nil || json.Unmarshal(b, &spec) != nil {
			a.log.Warn("skipping vm directory without a valid spec", "dir", a.vmDir(e.Name()))
			unmanaged[e.Name()] = "its directory has no readable spec"
			continue
		}
		if spec.Pool != "" && spec.Pool != a.poolID {
			a.log.Error("vm's storage pool is not mounted here: start the host agent with its --storage-pool", "vm", spec.Name, "pool", spec.Pool)
			unmanaged[e.Name()] = fmt.Sprintf("its storage pool is not mounted here (it is in %s): another host may run it", spec.Pool)
			continue
		}
		v := a.newVM(spec)
		a.mu.Lock()
		a.vms[spec.Name] = v
		a.mu.Unlock()
		p, err := qemu.Adopt(ctx, v.machine)
		if errors.Is(err, qemu.ErrNotRunning) {
			continue
		}
		if err != nil {
			a.log.Error("adopt failed", "vm", spec.Name, "err", err)
			unmanaged[e.Name()] = fmt.Sprintf("adoption failed: %v", err)
			continue
		}
		a.log.Info("adopted running vm", "vm", spec.Name, "pid", p.PID)
		if err := v.plugNICs(); err != nil {
			a.log.Error("adopted vm's network not wired: its guest is cut off until it restarts", "vm", spec.Name, "err", err)
		}
		v.attach(p)
		a.notify(spec.Name, hostproto.EventAdopted, false, fmt.Sprintf("pid %d", p.PID))
	}
	a.fenceUnadopted(ctx, unmanaged)
	return nil
}

// fenceUnadopted kills every QEMU of this data dir that the agent does not
// manage now: nothing would supervise it, report its crashes or stop it, and
// a pooled one may run on another host too, both writing its disk. why
// gives the reason for the VM directories loadAndAdopt gave up on.
func (a *Agent) fenceUnadopted(ctx context.Context, why map[string]string) {
	found, err := qemu.FindUnder(filepath.Join(a.cfg.DataDir, "vms"))
	if err != nil {
		a.log.Error("look for unmanaged qemu processes", "err", err)
	}
	for _, f := range found {
		name := filepath.Base(f.Dir)
		a.mu.Lock()
		v := a.vms[name]
		a.mu.Unlock()
		if v != nil {
			v.mu.Lock()
			adopted := v.proc != nil && v.proc.PID == f.PID
			v.mu.Unlock()
			if adopted {
				continue
			}
		}
		reason, ok := why[name]
		switch {
		case ok:
		case v == nil:
			reason = "no vm directory or spec on this host"
		default:
			reason = "not adopted: its pid file does not name it"
		}
		// Not the caller's context: adoption may have used it up, and the
		// kill must still happen.
		kctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		err := qemu.KillFound(kctx, f)
		cancel()
		if err != nil {
			a.log.Error("fence unmanaged qemu: kill failed", "vm", name, "pid", f.PID, "reason", reason, "err", err)
			continue
		}
		a.log.Warn("fenced unmanaged qemu: killed", "vm", name, "pid", f.PID, "reason", reason)
		a.notify(name, hostproto.EventFenced, true, "unmanaged qemu killed after an agent restart: "+reason)
	}
}

func (a *Agent) newVM(spec hostproto.VMSpec) *vm {
	dir, store := a.vmDir(spec.Name), a.storeDir(spec)
	return &vm{agent: a, spec: spec, storeDir: store, machine: a.machineFor(spec, dir, store), log: a.log.With("vm", spec.Name)}
}

func (a *Agent) notify(vm string, kind hostproto.EventKind, expected bool, msg string) {
	a.cfg.Notify(hostproto.Event{Time: time.Now().UTC(), Host: a.cfg.Name, VM: vm, Kind: kind, Expected: expected, Message: msg})
}

func (a *Agent) get(name string) (*vm, error) {
	if err := checkName("vm", name); err != nil {
		return nil, err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	v, ok := a.vms[name]
	if !ok {
		return nil, fmt.Errorf("%s: %w", name, ErrUnknownVM)
	}
	return v, nil
}

// Create makes the VM's directory and disk. A failure leaves nothing behind.
func (a *Agent) Create(ctx context.Context, req hostproto.CreateRequest) (_ hostproto.CreateResult, err error) {
	spec := req.Spec
	fail := func(err error) (hostproto.CreateResult, error) { return hostproto.CreateResult{}, err }
	if err := checkName("vm", spec.Name); err != nil {
		return fail(err)
	}
	a.mu.Lock()
	if _, ok := a.vms[spec.Name]; ok {
		a.mu.Unlock()
		return fail(fmt.Errorf("create %s: a vm of that name is already on this host", spec.Name))
	}
	if spec.HostPort == 0 {
		// The port the guest's endpoint is forwarded from is this host's:
		// ask this host's kernel, avoiding what the cluster's VMs hold.
		avoid := map[int]bool{}
		for _, p := range req.AvoidPorts {
			avoid[p] = true
		}
		for _, v := range a.vms {
			avoid[v.spec.HostPort] = true
		}
		if spec.HostPort, err = freePort(avoid); err != nil {
			a.mu.Unlock()
			return fail(fmt.Errorf("create %s: no free port for its endpoint: %w", spec.Name, err))
		}
	}
	v := a.newVM(spec)
	v.creating = true
	a.vms[spec.Name] = v
	a.mu.Unlock()

	dir := a.vmDir(spec.Name)
	madeStore := false
	defer func() {
		a.mu.Lock()
		defer a.mu.Unlock()
		if err != nil {
			delete(a.vms, spec.Name)
			os.RemoveAll(dir)
			if madeStore {
				os.RemoveAll(v.storeDir)
			}
			return
		}
		v.creating = false
	}()
	if err := v.machine.Validate(); err != nil {
		return fail(fmt.Errorf("create %s: %w", spec.Name, err))
	}
	if spec.Pool != "" && spec.Pool != a.poolID {
		return fail(fmt.Errorf("create %s: %w (it is meant for %s, this host has %q)", spec.Name, ErrWrongPool, spec.Pool, a.poolID))
	}
	if v.storeDir != dir {
		// Mkdir, not MkdirAll: a leftover directory of the same name in the
		// pool belongs to someone else and must not be reused or removed.
		if err := os.Mkdir(v.storeDir, 0o755); err != nil {
			return fail(fmt.Errorf("create %s in the storage pool: %w (remove %s if it is a leftover)", spec.Name, err, v.storeDir))
		}
		madeStore = true
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fail(fmt.Errorf("create %s: %w", spec.Name, err))
	}
	if err := v.makeDisk(ctx); err != nil {
		return fail(fmt.Errorf("create %s: %w", spec.Name, err))
	}
	if v.pooled() {
		if err := v.writeOwner(spec.Epoch); err != nil {
			return fail(fmt.Errorf("create %s: %w", spec.Name, err))
		}
	}
	if err := v.writeSpec(); err != nil {
		return fail(fmt.Errorf("create %s: %w", spec.Name, err))
	}
	return hostproto.CreateResult{HostPort: spec.HostPort}, nil
}

// Start boots the VM's QEMU process.
func (a *Agent) Start(ctx context.Context, r hostproto.VMRef) (hostproto.None, error) {
	name := r.VM
	v, err := a.get(name)
	if err != nil {
		return none(err)
	}
	return none(v.start(ctx))
}

// Stop asks the guest to power down (ACPI) and kills QEMU if it has not
// exited after timeout; force kills at once.
func (a *Agent) Stop(ctx context.Context, r hostproto.StopRequest) (hostproto.None, error) {
	name, force, timeout := r.VM, r.Force, r.Timeout()
	v, err := a.get(name)
	if err != nil {
		return none(err)
	}
	return none(v.stop(ctx, force, timeout))
}

// Delete kills the VM if it runs and removes its directory.
func (a *Agent) Delete(ctx context.Context, r hostproto.VMRef) (hostproto.None, error) {
	name := r.VM
	v, err := a.get(name)
	if errors.Is(err, ErrUnknownVM) {
		return hostproto.None{}, nil // already gone: deleting is idempotent
	}
	if err != nil {
		return none(err)
	}
	if err := v.stop(ctx, true, 0); err != nil && !errors.Is(err, ErrNotRunning) {
		return none(fmt.Errorf("delete %s: %w", name, err))
	}
	if v.pooled() {
		// The pool's files go only while this host holds the lease: an old
		// owner deleting would destroy the VM its successor runs.
		if err := v.checkOwner(); err != nil {
			return none(fmt.Errorf("delete %s: %w", name, err))
		}
		if err := os.RemoveAll(v.storeDir); err != nil {
			return none(fmt.Errorf("delete %s: %w", name, err))
		}
	}
	if err := os.RemoveAll(a.vmDir(name)); err != nil {
		return none(fmt.Errorf("delete %s: %w", name, err))
	}
	a.mu.Lock()
	delete(a.vms, name)
	a.mu.Unlock()
	return hostproto.None{}, nil
}

// Status reports what runs for name right now.
func (a *Agent) Status(ctx context.Context, r hostproto.VMRef) (hostproto.VMStatus, error) {
	name := r.VM
	v, err := a.get(name)
	if err != nil {
		return hostproto.VMStatus{}, err
	}
	s := v.status()
	if s.Running && s.RunState == "inmigrate" {
		// An incoming migration ends without a QMP event when the source
		// stopped the guest first (TCG): the guest waits here, paused,
		// and only QEMU knows. A manager settling a move must see that.
		if p, _, err := v.running(); err == nil {
			qctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			if st, err := p.Monitor.QueryStatus(qctx); err == nil && st.Status != "inmigrate" {
				v.setRunState(st.Status)
				s.RunState = st.Status
			}
			cancel()
		}
	}
	return s, nil
}

// SerialLog is the path of the VM's console log.
func (a *Agent) SerialLog(name string) (string, error) {
	v, err := a.get(name)
	if err != nil {
		return "", err
	}
	return v.machine.SerialLog(), nil
}

// Machine returns the QEMU definition of a VM, for tools that drive QEMU by hand.
func (a *Agent) Machine(name string) (qemu.Machine, error) {
	v, err := a.get(name)
	if err != nil {
		return qemu.Machine{}, err
	}
	return v.machine, nil
}

func memTotal() int64 {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0
	}
	var kb int64
	fmt.Sscanf(string(b), "MemTotal: %d kB", &kb)
	return kb << 10
}

// freePort asks the kernel for a free loopback port not in avoid.
func freePort(avoid map[int]bool) (int, error) {
	for i := 0; i < 100; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return 0, err
		}
		p := l.Addr().(*net.TCPAddr).Port
		l.Close()
		if !avoid[p] {
			return p, nil
		}
	}
	return 0, errors.New("no free port after 100 tries")
}
