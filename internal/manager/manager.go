// Package manager is Vigil's control plane: it validates requests, keeps the
// desired state of every VM in the store, drives host agents towards it, and
// publishes lifecycle events.
package manager

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/events"
	"github.com/vigil-project/vigil/internal/hostproto"
	"github.com/vigil-project/vigil/internal/store"
)

// Host is what the manager needs of a host agent. The dev agent passes the
// in-process hostagent.Agent; a remote host implements it over the network.
type Host interface {
	Name() string
	Info() api.Host
	Create(ctx context.Context, spec hostproto.VMSpec) error
	Start(ctx context.Context, name string) error
	Stop(ctx context.Context, name string, force bool, timeout time.Duration) error
	Delete(ctx context.Context, name string) error
	Status(name string) (hostproto.VMStatus, error)
	Console(ctx context.Context, name string, follow bool, w io.Writer) error

	Pause(ctx context.Context, name string) error
	Resume(ctx context.Context, name string) error
	Suspend(ctx context.Context, name string) (hostproto.SaveResult, error)
	DiscardState(name string) error
	SnapshotCreate(ctx context.Context, name, snap string, memory bool) (hostproto.SaveResult, error)
	SnapshotRevert(ctx context.Context, name, snap string, memory bool) error
	SnapshotDelete(ctx context.Context, name, snap string) error
	SnapshotSpace(name string) (map[string]int64, error)
	Exec(ctx context.Context, name string, req api.ExecRequest) (api.ExecResult, error)

	Restart(ctx context.Context, name string) error
	// Attach takes over a VM from the shared storage pool (its disk is
	// there already), with the spec's epoch as the new lease.
	Attach(ctx context.Context, spec hostproto.VMSpec) error
	// Live migration; see hostagent/migrate.go for the protocol.
	MigrateIn(ctx context.Context, spec hostproto.VMSpec) (uri string, err error)
	MigrateOut(ctx context.Context, name, uri string) (hostproto.Migration, error)
	MigrateFinish(ctx context.Context, name string) error
	MigrateAbort(ctx context.Context, name string) error
	SetHealth(name string, hangTimeoutSeconds, minUptimeSeconds int) error
	Fault(ctx context.Context, name, kind string) error
}

// errGuestAgentHint tells the operator what to check when a VM's guest agent
// is not connected.
var errGuestAgentHint = "is the vm running and has its guest agent sent a heartbeat? see 'vigil vm show'"

// record is a VM's desired state as stored under "vms/<name>".
type record struct {
	Spec    hostproto.VMSpec `json:"spec"`
	Host    string           `json:"host"`
	Desired string           `json:"desired"` // running, stopped, paused or suspended
	State   api.VMState      `json:"state"`
	Message string           `json:"message,omitempty"`
	// CurrentSnapshot is the parent of the next snapshot.
	CurrentSnapshot string             `json:"current_snapshot,omitempty"`
	LastOperation   *api.Operation     `json:"last_operation,omitempty"`
	Policy          api.RecoveryPolicy `json:"policy"`
	// Restarts are the automatic restarts recently made (the budget used).
	Restarts  []time.Time `json:"restarts,omitempty"`
	Condition string      `json:"condition,omitempty"`
	// Stranded: the host died with the VM's disk on its local storage;
	// the VM waits for the host to come back.
	Stranded bool `json:"stranded,omitempty"`
	// OpenIncident is the incident whose restarted guest has not sent its
	// first heartbeat yet. It is in the record, not in one manager's
	// memory, because that heartbeat may reach any manager.
	OpenIncident string `json:"open_incident,omitempty"`
	// Failover is set while the VM, moved off a dead host, starts on its
	// new one.
	Failover  *failover `json:"failover,omitempty"`
	CreatedAt time.Time `json:"created_at"`
	UpdatedAt time.Time `json:"updated_at"`
}

const (
	desiredRunning   = "running"
	desiredStopped   = "stopped"
	desiredPaused    = "paused"
	desiredSuspended = "suspended"
)

// DefaultStopTimeout is how long a graceful stop waits before killing.
const DefaultStopTimeout = 30 * time.Second

// Manager owns desired state and the lifecycle of VMs.
type Manager struct {
	store      *store.Store
	hosts      *registry
	overcommit Overcommit
	events     *events.Broker
	log        *slog.Logger
	limits     Limits
	ports      PortAllocator

	locksMu sync.Mutex
	locks   map[string]*sync.Mutex

	name        string
	leader      atomic.Bool
	leaderSince atomic.Int64 // unix nanoseconds; when this manager last became leader
	deadAfter   time.Duration
	instance    string         // random id of this process, for shared events
	share       chan api.Event // events to share with other managers; nil in dev mode
}

// PortAllocator hands out free host ports for guest endpoints.
type PortAllocator func(used map[int]bool) (int, error)

// Config configures a Manager.
type Config struct {
	Store *store.Store
	// Host, if set, is registered at once (the dev agent's in-process host).
	Host       Host
	Overcommit Overcommit
	Events     *events.Broker
	Logger     *slog.Logger
	Limits     Limits
	Ports      PortAllocator
	// Name identifies this manager among several (default "manager").
	Name string
	// ShareEvents makes this manager share its events with the other
	// managers through the store (see ShareEvents).
	ShareEvents bool
	// HostDeadAfter is how long a host may miss heartbeats before the
	// leader declares it dead and restarts its VMs elsewhere (default
	// DefaultHostDeadAfter). Hosts must fence themselves sooner.
	HostDeadAfter time.Duration
}

// New returns a Manager.
func New(cfg Config) *Manager {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Ports == nil {
		cfg.Ports = FreePort
	}
	if cfg.Name == "" {
		cfg.Name = "manager"
	}
	if cfg.HostDeadAfter == 0 {
		cfg.HostDeadAfter = DefaultHostDeadAfter
	}
	m := &Manager{name: cfg.Name, store: cfg.Store, hosts: newRegistry(), overcommit: cfg.Overcommit, events: cfg.Events, log: cfg.Logger,
		limits: cfg.Limits, ports: cfg.Ports, locks: map[string]*sync.Mutex{}, deadAfter: cfg.HostDeadAfter}
	m.instance = randomHex(8)
	if cfg.ShareEvents {
		m.share = make(chan api.Event, 1000)
	}
	if cfg.Host != nil {
		m.AddHost(cfg.Host)
	}
	return m
}

// SetLeader records whether this manager runs the controllers now.
func (m *Manager) SetLeader(b bool) {
	if b && !m.leader.Load() {
		m.leaderSince.Store(time.Now().UnixNano())
	}
	m.leader.Store(b)
}

// Events is the manager's event broker.
func (m *Manager) Events() *events.Broker { return m.events }

// lock takes the per-VM operation lock, or fails with ErrBusy: two
// operations on one VM at once would leave it in no named state.
func (m *Manager) lock(name string) (func(), error) {
	m.locksMu.Lock()
	l, ok := m.locks[name]
	if !ok {
		l = &sync.Mutex{}
		m.locks[name] = l
	}
	m.locksMu.Unlock()
	if !l.TryLock() {
		return nil, errorf(ErrBusy, "vm %s is busy with another operation: retry when it is done", name)
	}
	return l.Unlock, nil
}

// lockLoad takes the VM's operation lock and reads its record. On error
// the lock is not held.
func (m *Manager) lockLoad(ctx context.Context, name string) (record, int64, func(), error) {
	unlock, err := m.lock(name)
	if err != nil {
		return record{}, 0, nil, err
	}
	r, rev, err := m.load(ctx, name)
	if err != nil {
		unlock()
		return record{}, 0, nil, err
	}
	return r, rev, unlock, nil
}

// waitLock takes the per-VM lock, waiting for an operation in progress to
// end; for handlers of host events, which must not be refused as busy.
func (m *Manager) waitLock(ctx context.Context, name string) (func(), error) {
	for {
		if unlock, err := m.lock(name); err == nil {
			return unlock, nil
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func vmKey(name string) string { return "vms/" + name }

func (m *Manager) load(ctx context.Context, name string) (record, int64, error) {
	var r record
	rev, err := m.store.Get(ctx, vmKey(name), &r)
	if errors.Is(err, store.ErrNotFound) {
		return r, 0, errorf(ErrNotFound, "vm %s does not exist: see 'vigil vm list'", name)
	}
	if err != nil {
		return r, 0, wrapf(ErrUnavailable, err, "read vm %s", name)
	}
	return r, rev, nil
}

// save writes r if nobody else changed it since rev; the manager is the only
// writer, so a conflict means a bug or a second manager and is reported.
func (m *Manager) save(ctx context.Context, r *record, rev int64) (int64, error) {
	r.UpdatedAt = time.Now().UTC()
	nrev, err := m.store.Update(ctx, vmKey(r.Spec.Name), rev, r)
	if err != nil {
		return rev, wrapf(ErrUnavailable, err, "save vm %s", r.Spec.Name)
	}
	return nrev, nil
}

// setState records a new state and publishes it.
func (m *Manager) setState(ctx context.Context, r *record, rev int64, s api.VMState, msg string) (int64, error) {
	if r.State == s && r.Message == msg {
		return rev, nil
	}
	r.State, r.Message = s, msg
	nrev, err := m.save(ctx, r, rev)
	if err != nil {
		return rev, err
	}
	m.log.Info("vm state", "vm", r.Spec.Name, "state", s, "message", msg)
	m.publish(api.Event{Type: "vm.state", VM: r.Spec.Name, Host: r.Host, State: s, Message: msg})
	return nrev, nil
}

// Create defines a VM, makes its disk on the host and optionally starts it.
// A failure anywhere removes whatever was made: no half-created VM remains.
func (m *Manager) Create(ctx context.Context, req api.VMCreateRequest) (api.VM, error) {
	if err := validateCreate(req, m.limits); err != nil {
		return api.VM{}, err
	}
	var policy api.RecoveryPolicy
	if req.Policy != nil {
		if err := validatePolicy(*req.Policy); err != nil {
			return api.VM{}, err
		}
		policy = *req.Policy
	}
	unlock, err := m.lock(req.Name)
	if err != nil {
		return api.VM{}, err
	}
	defer unlock()

	rs, err := m.records(ctx)
	if err != nil {
		return api.VM{}, err
	}
	cands := m.hosts.candidates(rs)
	hostName, err := place(cands, need{mem: req.MemoryBytes, cpus: req.CPUs, pin: req.Host}, m.overcommit)
	if err != nil {
		return api.VM{}, err
	}
	// A VM lives in its host's storage pool when the host has one, so any
	// host of the pool can take it over.
	var pool string
	for _, c := range cands {
		if c.host.Name == hostName {
			pool = c.host.StoragePool
		}
	}
	used := map[int]bool{}
	for _, r := range rs {
		used[r.rec.Spec.HostPort] = true
	}
	port, err := m.ports(used)
	if err != nil {
		return api.VM{}, wrapf(ErrUnavailable, err, "no free port for the endpoint of %s", req.Name)
	}
	now := time.Now().UTC()
	r := record{
		Spec: hostproto.VMSpec{Name: req.Name, UUID: newUUID(), MemoryBytes: req.MemoryBytes, CPUs: req.CPUs,
			DiskBytes: req.DiskBytes, HostPort: port, HangTimeoutSeconds: policy.HangTimeoutSeconds, MinUptimeSeconds: policy.MinUptimeSeconds,
			Pool: pool, Epoch: 1},
		Host: hostName, Desired: desiredStopped, State: api.StateCreating, CreatedAt: now, UpdatedAt: now, Policy: policy,
	}
	rev, err := m.store.Create(ctx, vmKey(req.Name), r)
	if errors.Is(err, store.ErrExists) {
		return api.VM{}, errorf(ErrConflict, "vm %s already exists: pick another name, or delete it first", req.Name)
	}
	if err != nil {
		return api.VM{}, wrapf(ErrUnavailable, err, "create vm %s", req.Name)
	}
	if err := m.hostNamed(r.Host).Create(ctx, r.Spec); err != nil {
		m.store.Delete(context.WithoutCancel(ctx), vmKey(req.Name))
		return api.VM{}, fmt.Errorf("create vm %s on host %s: %w", req.Name, r.Host, err)
	}
	m.publish(api.Event{Type: "vm.created", VM: req.Name, Host: r.Host})
	if rev, err = m.setState(ctx, &r, rev, api.StateStopped, ""); err != nil {
		return api.VM{}, err
	}
	if req.Start {
		if err := m.start(ctx, &r, rev); err != nil {
			return m.view(r), err
		}
	}
	return m.view(r), nil
}

// ChangeState runs a start, stop or restart.
func (m *Manager) ChangeState(ctx context.Context, name string, req api.VMStateRequest) (api.VM, error) {
	if err := validName(name); err != nil {
		return api.VM{}, err
	}
	timeout := DefaultStopTimeout
	if req.TimeoutSeconds < 0 {
		return api.VM{}, errorf(ErrInvalid, "timeout %ds is negative", req.TimeoutSeconds)
	}
	if req.TimeoutSeconds > 0 {
		timeout = time.Duration(req.TimeoutSeconds) * time.Second
	}
	switch req.Action {
	case api.ActionStart, api.ActionStop, api.ActionRestart, api.ActionPause, api.ActionResume:
	default:
		return api.VM{}, errorf(ErrInvalid, "unknown action %q: use start, stop, restart, pause or resume", req.Action)
	}
	if req.ToDisk && req.Action != api.ActionPause {
		return api.VM{}, errorf(ErrInvalid, "to_disk goes with the pause action")
	}
	if req.DiscardState && req.Action != api.ActionResume {
		return api.VM{}, errorf(ErrInvalid, "discard_state goes with the resume action")
	}
	r, rev, unlock, err := m.lockLoad(ctx, name)
	if err != nil {
		return api.VM{}, err
	}
	defer unlock()
	act := m.actual(r)
	running := act.Running
	if r.State == api.StateSuspended && act.SavedState && !running {
		switch req.Action {
		case api.ActionStart, api.ActionRestart:
			return m.view(r), errorf(ErrConflict, "vm %s is suspended: continue it with 'vigil vm resume %s', or cold-boot it with 'vigil vm resume %s --discard-state'", name, name, name)
		case api.ActionStop:
			return m.view(r), errorf(ErrConflict, "vm %s is suspended, not running: to throw its saved state away and keep it off, run 'vigil vm resume %s --discard-state' then 'vigil vm stop %s'", name, name, name)
		}
	}
	// A paused guest cannot act on an ACPI power-down: stopping it is a kill.
	force := req.Force || act.RunState == "paused"
	switch req.Action {
	case api.ActionStart:
		if running {
			return m.view(r), errorf(ErrConflict, "vm %s is already running", name)
		}
		err = m.start(ctx, &r, rev)
	case api.ActionStop:
		if !running {
			return m.view(r), errorf(ErrConflict, "vm %s is already stopped", name)
		}
		_, err = m.stop(ctx, &r, rev, force, timeout)
	case api.ActionRestart:
		if running {
			if rev, err = m.stop(ctx, &r, rev, force, timeout); err != nil {
				break
			}
		}
		err = m.start(ctx, &r, rev)
	case api.ActionPause:
		err = m.pause(ctx, &r, rev, act, req.ToDisk)
	case api.ActionResume:
		err = m.resume(ctx, &r, rev, act, req.DiscardState)
	}
	return m.view(r), err
}

func (m *Manager) start(ctx context.Context, r *record, rev int64) error {
	r.Desired = desiredRunning
	rev, err := m.setState(ctx, r, rev, api.StateStarting, "")
	if err != nil {
		return err
	}
	if err := m.hostNamed(r.Host).Start(ctx, r.Spec.Name); err != nil {
		r.Desired = desiredStopped
		m.setState(context.WithoutCancel(ctx), r, rev, api.StateStopped, "start failed: "+err.Error())
		return fmt.Errorf("start vm %s: %w", r.Spec.Name, err)
	}
	_, err = m.setState(ctx, r, rev, api.StateRunning, "")
	return err
}

func (m *Manager) stop(ctx context.Context, r *record, rev int64, force bool, timeout time.Duration) (int64, error) {
	r.Desired = desiredStopped
	rev, err := m.setState(ctx, r, rev, api.StateStopping, "")
	if err != nil {
		return rev, err
	}
	if err := m.hostNamed(r.Host).Stop(ctx, r.Spec.Name, force, timeout); err != nil {
		// Still running as far as we know: say so, the controller will retry.
		m.setState(context.WithoutCancel(ctx), r, rev, api.StateStopping, "stop failed: "+err.Error())
		return rev, fmt.Errorf("stop vm %s: %w", r.Spec.Name, err)
	}
	return m.setState(ctx, r, rev, api.StateStopped, "")
}

// Delete stops the VM at once and removes it with its disk, files and
// snapshots. A VM with snapshots needs force: they go with it.
func (m *Manager) Delete(ctx context.Context, name string, force bool) error {
	if err := validName(name); err != nil {
		return err
	}
	r, rev, unlock, err := m.lockLoad(ctx, name)
	if err != nil {
		return err
	}
	defer unlock()
	if !force {
		ss, err := m.snapshots(ctx, name)
		if err != nil {
			return err
		}
		if len(ss) > 0 {
			return errorf(ErrConflict, "vm %s has %d snapshot(s) that would be deleted with it: add --force to delete them too", name, len(ss))
		}
	}
	return m.delete(ctx, &r, rev)
}

func (m *Manager) delete(ctx context.Context, r *record, rev int64) error {
	r.Desired = desiredStopped
	if _, err := m.setState(ctx, r, rev, api.StateDeleting, ""); err != nil {
		return err
	}
	// Files go before the record: if we fail in between, the record still
	// says "deleting" and the controller finishes the job.
	if err := m.hostNamed(r.Host).Delete(ctx, r.Spec.Name); err != nil {
		return fmt.Errorf("delete vm %s: %w", r.Spec.Name, err)
	}
	if err := m.store.DeletePrefix(ctx, "incidents/"+r.Spec.Name+"/"); err != nil {
		return wrapf(ErrUnavailable, err, "delete incidents of vm %s", r.Spec.Name)
	}
	if err := m.store.DeletePrefix(ctx, "snapshots/"+r.Spec.Name+"/"); err != nil {
		return wrapf(ErrUnavailable, err, "delete snapshots of vm %s", r.Spec.Name)
	}
	if err := m.store.Delete(ctx, vmKey(r.Spec.Name)); err != nil {
		return wrapf(ErrUnavailable, err, "delete vm %s", r.Spec.Name)
	}
	m.publish(api.Event{Type: "vm.deleted", VM: r.Spec.Name, Host: r.Host})
	return nil
}

// Get reports one VM.
func (m *Manager) Get(ctx context.Context, name string) (api.VM, error) {
	if err := validName(name); err != nil {
		return api.VM{}, err
	}
	r, _, err := m.load(ctx, name)
	if err != nil {
		return api.VM{}, err
	}
	return m.view(r), nil
}

// List reports every VM, by name.
func (m *Manager) List(ctx context.Context) ([]api.VM, error) {
	rs, err := m.records(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]api.VM, 0, len(rs))
	for _, r := range rs {
		out = append(out, m.view(r.rec))
	}
	return out, nil
}

// Exec runs a command in the guest through the guest agent. It does not take
// the VM's operation lock: it changes nothing Vigil manages.
func (m *Manager) Exec(ctx context.Context, name string, req api.ExecRequest) (api.ExecResult, error) {
	if req.Command == "" {
		return api.ExecResult{}, errorf(ErrInvalid, "no command given")
	}
	if req.TimeoutSeconds < 0 || req.TimeoutSeconds > 3600 {
		return api.ExecResult{}, errorf(ErrInvalid, "timeout %ds is out of range 0-3600", req.TimeoutSeconds)
	}
	vm, err := m.Get(ctx, name)
	if err != nil {
		return api.ExecResult{}, err
	}
	if vm.Guest == nil {
		return api.ExecResult{}, errorf(ErrConflict, "vm %s has no connected guest agent (state %s): %s", name, vm.State, errGuestAgentHint)
	}
	res, err := m.hostNamed(vm.Host).Exec(ctx, name, req)
	if err != nil {
		return res, wrapf(ErrConflict, err, "exec in vm %s", name)
	}
	return res, nil
}

// Hosts reports the hosts, by name.
func (m *Manager) Hosts() []api.Host {
	return m.hosts.list()
}

// Console copies the VM's serial console to w; with follow it keeps copying
// until ctx ends.
func (m *Manager) Console(ctx context.Context, name string, follow bool, w io.Writer) error {
	vm, err := m.Get(ctx, name)
	if err != nil {
		return err
	}
	return m.hostNamed(vm.Host).Console(ctx, name, follow, w)
}

type storedRecord struct {
	rec record
	rev int64
}

func (m *Manager) records(ctx context.Context) ([]storedRecord, error) {
	kvs, err := m.store.List(ctx, "vms/")
	if err != nil {
		return nil, wrapf(ErrUnavailable, err, "list vms")
	}
	out := make([]storedRecord, 0, len(kvs))
	for _, kv := range kvs {
		var r record
		if err := json.Unmarshal(kv.Value, &r); err != nil {
			m.log.Error("skipping unreadable vm record", "key", kv.Key, "err", err)
			continue
		}
		out = append(out, storedRecord{r, kv.Revision})
	}
	return out, nil
}

func (m *Manager) actual(r record) hostproto.VMStatus {
	st, err := m.hostNamed(r.Host).Status(r.Spec.Name)
	if err != nil {
		return hostproto.VMStatus{Name: r.Spec.Name}
	}
	return st
}

// view merges the stored record with what the host reports.
func (m *Manager) view(r record) api.VM {
	st := m.actual(r)
	v := api.VM{
		Name: r.Spec.Name, State: r.State, Host: r.Host, MemoryBytes: r.Spec.MemoryBytes, CPUs: r.Spec.CPUs,
		DiskBytes: r.Spec.DiskBytes, Endpoint: fmt.Sprintf("127.0.0.1:%d", r.Spec.HostPort),
		CreatedAt: r.CreatedAt, Message: r.Message, CurrentSnapshot: r.CurrentSnapshot, LastOperation: r.LastOperation,
		Policy: withDefaults(r.Policy), Condition: r.Condition, StoragePool: r.Spec.Pool,
	}
	if st.Running {
		v.PID = st.PID
		v.Guest = st.Guest
	}
	return v
}

func newUUID() string {
	var b [16]byte
	rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}
