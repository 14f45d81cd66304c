// Package simhost is a host with no hypervisor, for the scale simulator
// (cmd/vigil-sim): it answers the real host protocol from memory, so that
// a manager can be driven by a thousand hosts on one machine. VMs "run" as
// entries in a map: they start, stop, move and report heartbeats; what
// needs a real QEMU (consoles, snapshots, migration streams, exec) is
// refused with ErrNotSimulated. Nothing outside the simulator uses it.
package simhost

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/hostproto"
)

// ErrNotSimulated answers what a simulated host cannot do.
var ErrNotSimulated = errors.New("not simulated: this host has no hypervisor")

type vm struct {
	spec      hostproto.VMSpec
	running   bool
	paused    bool
	pid       int
	startedAt time.Time
	bootID    string
	seq       uint64
}

// Host is one simulated host.
type Host struct {
	name   string
	pool   string
	notify func(hostproto.Event)
	cutOff atomic.Bool

	// What the simulator counts: VM starts (restarts included), fences
	// that killed VMs, and the VMs they killed.
	starts, fences, fenced atomic.Int64

	mu       sync.Mutex
	vms      map[string]*vm
	nextPID  int
	nextPort int
}

// New is a simulated host named name with a share of storage pool pool
// (every VM can move between hosts of one pool); notify sends its events
// to the managers with the next heartbeat.
func New(name, pool string, notify func(hostproto.Event)) *Host {
	return &Host{name: name, pool: pool, notify: notify, vms: map[string]*vm{}, nextPID: 1000, nextPort: 20000}
}

// Capacity of every simulated host: a large server.
const (
	CPUs        = 64
	MemoryBytes = 512 << 30
)

// HostInfo is what the host registers with.
func (h *Host) HostInfo() api.Host {
	h.mu.Lock()
	n := len(h.vms)
	h.mu.Unlock()
	return api.Host{Name: h.name, State: "up", Accel: "sim", CPUs: CPUs, MemoryBytes: MemoryBytes, VMs: n,
		QEMUVersion: "simulated", StoragePool: h.pool, PoolLocks: "shared"}
}

// Statuses are the VMs as a heartbeat reports them; each running VM's guest
// sent a heartbeat a moment ago.
func (h *Host) Statuses() []hostproto.VMStatus {
	h.mu.Lock()
	defer h.mu.Unlock()
	now := time.Now().UTC()
	out := make([]hostproto.VMStatus, 0, len(h.vms))
	for _, v := range h.vms {
		out = append(out, h.statusLocked(v, now))
	}
	slices.SortFunc(out, func(a, b hostproto.VMStatus) int { return strings.Compare(a.Name, b.Name) })
	return out
}

func (h *Host) statusLocked(v *vm, now time.Time) hostproto.VMStatus {
	s := hostproto.VMStatus{Name: v.spec.Name}
	if v.running {
		v.seq++
		s.Running, s.PID, s.StartedAt, s.RunState = true, v.pid, v.startedAt, "running"
		if v.paused {
			s.RunState = "paused"
		}
		s.Guest = &api.GuestInfo{BootID: v.bootID, Seq: v.seq, UptimeSeconds: now.Sub(v.startedAt).Seconds(), LastHeartbeat: now, Agent: "simulated"}
		s.Usage = &hostproto.VMUsage{CPUSeconds: now.Sub(v.startedAt).Seconds() / 100}
	}
	return s
}

// Fence stops every VM (the host lost every manager).
func (h *Host) Fence(reason string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, v := range h.vms {
		if v.running {
			v.running = false
			n++
		}
	}
	if n > 0 {
		h.fences.Add(1)
		h.fenced.Add(int64(n))
	}
	return n
}

// Counts is what a host did since it was made.
type Counts struct {
	Starts    int64 // VMs started, restarts included
	Fences    int64 // times the host fenced itself with VMs running
	FencedVMs int64 // VMs those fences killed
}

// Counts reads the host's counters; it does not wait for a frozen host.
func (h *Host) Counts() Counts {
	return Counts{Starts: h.starts.Load(), Fences: h.fences.Load(), FencedVMs: h.fenced.Load()}
}

// Add sums two counts.
func (c Counts) Add(d Counts) Counts {
	return Counts{c.Starts + d.Starts, c.Fences + d.Fences, c.FencedVMs + d.FencedVMs}
}

// SetCutOff records whether the host is cut off from the managers.
func (h *Host) SetCutOff(b bool) { h.cutOff.Store(b) }

// Sweep has nothing to clean up.
func (h *Host) Sweep() {}

func (h *Host) get(name string) (*vm, error) {
	v, ok := h.vms[name]
	if !ok {
		return nil, fmt.Errorf("%s: %w", name, hostproto.ErrUnknownVM)
	}
	return v, nil
}

func (h *Host) event(vmName string, kind hostproto.EventKind, msg string) {
	if h.notify != nil {
		h.notify(hostproto.Event{Time: time.Now().UTC(), Host: h.name, VM: vmName, Kind: kind, Expected: true, Message: msg})
	}
}

func (h *Host) startLocked(v *vm) {
	h.starts.Add(1)
	h.nextPID++
	v.running, v.paused, v.pid, v.startedAt = true, false, h.nextPID, time.Now().UTC()
	v.bootID = fmt.Sprintf("%08x-0000-4000-8000-%012x", h.nextPID, time.Now().UnixNano()&0xffffffffffff)
	v.seq = 0
}

// The host protocol (hostproto.Handler).

func (h *Host) Info(context.Context, hostproto.None) (api.Host, error) { return h.HostInfo(), nil }

func (h *Host) Create(_ context.Context, r hostproto.CreateRequest) (hostproto.CreateResult, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if _, ok := h.vms[r.Spec.Name]; ok {
		return hostproto.CreateResult{}, fmt.Errorf("vm %s exists on host %s", r.Spec.Name, h.name)
	}
	spec := r.Spec
	if spec.HostPort == 0 {
		h.nextPort++
		spec.HostPort = h.nextPort
	}
	h.vms[spec.Name] = &vm{spec: spec}
	return hostproto.CreateResult{HostPort: spec.HostPort}, nil
}

func (h *Host) Attach(_ context.Context, spec hostproto.VMSpec) (hostproto.None, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if v, ok := h.vms[spec.Name]; ok {
		v.spec = spec
		return hostproto.None{}, nil
	}
	h.vms[spec.Name] = &vm{spec: spec}
	return hostproto.None{}, nil
}

func (h *Host) Start(_ context.Context, r hostproto.VMRef) (hostproto.None, error) {
	h.mu.Lock()
	v, err := h.get(r.VM)
	if err == nil && !v.running {
		h.startLocked(v)
	}
	h.mu.Unlock()
	if err == nil {
		h.event(r.VM, hostproto.EventStarted, "simulated")
	}
	return hostproto.None{}, err
}

func (h *Host) Stop(_ context.Context, r hostproto.StopRequest) (hostproto.None, error) {
	h.mu.Lock()
	v, err := h.get(r.VM)
	was := err == nil && v.running
	if was {
		v.running = false
	}
	h.mu.Unlock()
	if was {
		h.event(r.VM, hostproto.EventExited, "stopped")
	}
	return hostproto.None{}, err
}

func (h *Host) Restart(_ context.Context, r hostproto.VMRef) (hostproto.None, error) {
	h.mu.Lock()
	v, err := h.get(r.VM)
	if err == nil {
		h.startLocked(v)
	}
	h.mu.Unlock()
	return hostproto.None{}, err
}

func (h *Host) Delete(_ context.Context, r hostproto.VMRef) (hostproto.None, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	delete(h.vms, r.VM)
	return hostproto.None{}, nil
}

func (h *Host) Status(_ context.Context, r hostproto.VMRef) (hostproto.VMStatus, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	v, err := h.get(r.VM)
	if err != nil {
		return hostproto.VMStatus{}, err
	}
	return h.statusLocked(v, time.Now().UTC()), nil
}

func (h *Host) Pause(_ context.Context, r hostproto.VMRef) (hostproto.None, error) {
	return hostproto.None{}, h.setPaused(r.VM, true)
}

func (h *Host) Resume(_ context.Context, r hostproto.VMRef) (hostproto.None, error) {
	return hostproto.None{}, h.setPaused(r.VM, false)
}

func (h *Host) setPaused(name string, p bool) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	v, err := h.get(name)
	if err != nil {
		return err
	}
	if !v.running {
		return fmt.Errorf("vm %s is not running on simulated host %s", name, h.name)
	}
	v.paused = p
	return nil
}

func (h *Host) SetHealth(context.Context, hostproto.HealthRequest) (hostproto.None, error) {
	return hostproto.None{}, nil
}

func (h *Host) SetNetworks(context.Context, hostproto.NetworksRequest) (hostproto.None, error) {
	return hostproto.None{}, nil
}

func (h *Host) Usage(_ context.Context, r hostproto.VMRef) (api.UsageHistory, error) {
	return api.UsageHistory{VM: r.VM, Host: h.name, Samples: []api.UsageSample{}}, nil
}

// What needs a hypervisor.

func (h *Host) Suspend(context.Context, hostproto.VMRef) (hostproto.SaveResult, error) {
	return hostproto.SaveResult{}, ErrNotSimulated
}
func (h *Host) DiscardState(context.Context, hostproto.VMRef) (hostproto.None, error) {
	return hostproto.None{}, ErrNotSimulated
}
func (h *Host) SnapshotCreate(context.Context, hostproto.SnapshotRequest) (hostproto.SaveResult, error) {
	return hostproto.SaveResult{}, ErrNotSimulated
}
func (h *Host) SnapshotRevert(context.Context, hostproto.SnapshotRequest) (hostproto.None, error) {
	return hostproto.None{}, ErrNotSimulated
}
func (h *Host) SnapshotDelete(context.Context, hostproto.SnapshotRequest) (hostproto.None, error) {
	return hostproto.None{}, ErrNotSimulated
}
func (h *Host) SnapshotSpace(context.Context, hostproto.VMRef) (hostproto.Space, error) {
	return hostproto.Space{Bytes: map[string]int64{}}, nil
}
func (h *Host) Exec(context.Context, hostproto.ExecRequest) (api.ExecResult, error) {
	return api.ExecResult{}, ErrNotSimulated
}
func (h *Host) Configure(context.Context, hostproto.ConfigureRequest) (hostproto.None, error) {
	return hostproto.None{}, ErrNotSimulated
}
func (h *Host) Screenshot(context.Context, hostproto.VMRef) (hostproto.ScreenshotResult, error) {
	return hostproto.ScreenshotResult{}, ErrNotSimulated
}
func (h *Host) Fault(context.Context, hostproto.FaultRequest) (hostproto.None, error) {
	return hostproto.None{}, ErrNotSimulated
}
func (h *Host) MigrateIn(context.Context, hostproto.MigrateInRequest) (hostproto.MigrateInResult, error) {
	return hostproto.MigrateInResult{}, ErrNotSimulated
}
func (h *Host) MigrateOut(context.Context, hostproto.MigrateOutRequest) (hostproto.Migration, error) {
	return hostproto.Migration{}, ErrNotSimulated
}
func (h *Host) MigrateFinish(context.Context, hostproto.VMRef) (hostproto.None, error) {
	return hostproto.None{}, ErrNotSimulated
}
func (h *Host) MigrateAbort(context.Context, hostproto.VMRef) (hostproto.None, error) {
	return hostproto.None{}, nil
}
func (h *Host) Console(context.Context, hostproto.ConsoleRequest, io.Writer) error {
	return ErrNotSimulated
}
func (h *Host) VNC(context.Context, hostproto.VMRef) (io.ReadWriteCloser, error) {
	return nil, ErrNotSimulated
}
func (h *Host) Protect(context.Context, hostproto.ProtectRequest) (hostproto.None, error) {
	return hostproto.None{}, ErrNotSimulated
}
func (h *Host) Unprotect(context.Context, hostproto.VMRef) (hostproto.None, error) {
	return hostproto.None{}, nil
}
func (h *Host) Standby(context.Context, hostproto.StandbyRequest) (hostproto.None, error) {
	return hostproto.None{}, ErrNotSimulated
}
func (h *Host) StandbyDrop(context.Context, hostproto.VMRef) (hostproto.None, error) {
	return hostproto.None{}, nil
}
func (h *Host) Activate(context.Context, hostproto.ActivateRequest) (hostproto.ActivateResult, error) {
	return hostproto.ActivateResult{}, ErrNotSimulated
}
func (h *Host) Checkpoints(context.Context, hostproto.CheckpointsRequest) (io.ReadWriteCloser, error) {
	return nil, ErrNotSimulated
}

var _ hostproto.Handler = (*Host)(nil)

// Freeze stops the host as a hung machine stops: everything that reads or
// changes it (its heartbeats' statuses, the managers' calls, its fencing
// watchdog) waits until Thaw. Its VMs run nothing meanwhile.
func (h *Host) Freeze() { h.mu.Lock() }

// Thaw lets a frozen host go on where it stopped.
func (h *Host) Thaw() { h.mu.Unlock() }

// RunningAmong names those of names running here now: a sampler that
// watches a few VMs across a thousand hosts costs a lookup per name, not a
// walk of every host's VMs.
func (h *Host) RunningAmong(names []string) []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []string
	for _, name := range names {
		if v, ok := h.vms[name]; ok && v.running {
			out = append(out, name)
		}
	}
	return out
}

// Running names the VMs running here now.
func (h *Host) Running() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []string
	for name, v := range h.vms {
		if v.running {
			out = append(out, name)
		}
	}
	return out
}
