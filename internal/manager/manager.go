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
	"github.com/vigil-project/vigil/internal/bootsvc"
	"github.com/vigil-project/vigil/internal/cloudinit"
	"github.com/vigil-project/vigil/internal/events"
	"github.com/vigil-project/vigil/internal/hostproto"
	"github.com/vigil-project/vigil/internal/imagestore"
	"github.com/vigil-project/vigil/internal/pki"
	"github.com/vigil-project/vigil/internal/store"
	"github.com/vigil-project/vigil/internal/workqueue"
)

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
	// Op is the operation in progress (see vmop.go).
	Op *opIntent `json:"op,omitempty"`
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
	// new one (across passes: a refused start is retried).
	Failover *failover `json:"failover,omitempty"`
	// Protection is the VM's synchronized standby, if it has one.
	Protection *protection `json:"protection,omitempty"`
	CreatedAt  time.Time   `json:"created_at"`
	UpdatedAt  time.Time   `json:"updated_at"`
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
	// protTold is when the protection pass last re-told each VM's hosts
	// (guarded by protMu; see mayTell).
	protMu   sync.Mutex
	protTold map[string]time.Time
	protBusy map[string]bool // protections being worked on
	// metrics are the manager's Prometheus instruments (see metrics.go).
	metrics *metrics

	store      *store.Store
	hosts      *registry
	overcommit Overcommit
	events     *events.Broker
	log        *slog.Logger
	limits     Limits
	locks      *locker
	// unreleased are locks whose release failed; the janitor retries.
	unreleased chan store.Lock
	// kept are VM locks held between operations (keptlock.go).
	kept *keptLocks
	// queue holds the VMs to look at, with the host events that wait for
	// them; its workers are the only place events are acted on.
	queue *workqueue.Queue[*hostEvent]
	// placeMu serialises placement decisions made by this manager, so two
	// VMs placed at once each see the other's reservation; moving (guarded
	// by it) holds room for VMs on their way to a host.
	placeMu sync.Mutex
	moving  map[string]reservation
	placed  map[string]placed // VMs defined here the cache may not show yet (recordcache.go)
	// stepHook runs after each named step of a multi-phase operation.
	stepHook func(string)
	// identity is the cluster CA and this manager's certificate (nil: no
	// remote hosts, as in a unit test).
	identity *Identity
	certTTL  time.Duration
	tokens   *tokenCache
	passes   *passes // console tickets and sign-in codes (passes.go)
	cache    *recordCache
	auditQ   chan api.AuditEntry
	// images is this manager's blob store (nil: no images); url is where
	// the other managers reach its API.
	images *imagestore.Store
	// boot is the registry of stateless hosts; bootCfg, if set, the boot
	// service this manager runs.
	boot    *bootsvc.Registry
	bootCfg *bootsvc.Config
	// rolloutKick wakes the rollout loop.
	rolloutKick chan struct{}
	url         string

	name        string
	leader      atomic.Bool
	leaderSince atomic.Int64 // monotonic: see SetLeader
	started     time.Time    // this manager's start, the origin of leaderSince
	deadAfter   time.Duration
	resync      time.Duration
	instance    string         // random id of this process, for shared events
	share       chan api.Event // events to share with other managers; nil in dev mode
}

// Config configures a Manager.
type Config struct {
	Store *store.Store
	// Host, if set, is registered at once (the dev agent's in-process host).
	Host       Host
	Overcommit Overcommit
	Events     *events.Broker
	Logger     *slog.Logger
	Limits     Limits
	// Name identifies this manager among several (default "manager").
	Name string
	// ShareEvents makes this manager share its events with the other
	// managers through the store (see ShareEvents).
	ShareEvents bool
	// HostDeadAfter is how long a host may miss heartbeats before the
	// leader declares it dead and restarts its VMs elsewhere (default
	// DefaultHostDeadAfter). Hosts must fence themselves sooner.
	HostDeadAfter time.Duration
	// Resync is how often the leader looks at every VM (default 2s).
	Resync time.Duration
	// StepHook, if set, runs after each named step of a multi-phase
	// operation with "op/step" (e.g. "migrate/transfer").
	StepHook func(step string)
	// Identity is the cluster CA and this manager's certificate; without
	// it no host can join (the dev agent's in-process host needs none).
	Identity *Identity
	// CertTTL is the life of the host certificates this manager issues
	// (default pki.DefaultTTL).
	CertTTL time.Duration
	// Images is where this manager keeps image blobs (nil: none).
	Images *imagestore.Store
	// URL is where the other managers reach this one's API.
	URL string
	// BootImages is where this manager keeps host images for network
	// boot; Boot, if set, runs the boot service (bootsvc).
	BootImages string
	Boot       *bootsvc.Config
}

// New returns a Manager. Run (and, while leading, Lead) make it work.
func New(cfg Config) *Manager {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Name == "" {
		cfg.Name = "manager"
	}
	if cfg.HostDeadAfter == 0 {
		cfg.HostDeadAfter = DefaultHostDeadAfter
	}
	if cfg.Resync == 0 {
		cfg.Resync = 2 * time.Second
	}
	if cfg.StepHook == nil {
		cfg.StepHook = func(string) {}
	}
	m := &Manager{name: cfg.Name, store: cfg.Store, hosts: newRegistry(), overcommit: cfg.Overcommit, events: cfg.Events, log: cfg.Logger,
		limits: cfg.Limits, deadAfter: cfg.HostDeadAfter, resync: cfg.Resync, stepHook: cfg.StepHook,
		locks:       &locker{cli: cfg.Store.Client(), ttl: lockTTL},
		unreleased:  make(chan store.Lock, 1000),
		kept:        newKeptLocks(),
		queue:       workqueue.New[*hostEvent](workqueue.Config{BaseDelay: 50 * time.Millisecond, MaxDelay: 2 * time.Second, UrgentWorkers: failoverWorkers}),
		started:     time.Now(),
		moving:      map[string]reservation{},
		identity:    cfg.Identity,
		certTTL:     cfg.CertTTL,
		tokens:      &tokenCache{byID: map[string]tokenRecord{}},
		passes:      newPasses(),
		cache:       &recordCache{byName: map[string]storedRecord{}},
		placed:      map[string]placed{},
		auditQ:      make(chan api.AuditEntry, 4096),
		images:      cfg.Images,
		url:         cfg.URL,
		boot:        &bootsvc.Registry{Store: cfg.Store, ImagesDir: cfg.BootImages},
		bootCfg:     cfg.Boot,
		rolloutKick: make(chan struct{}, 1),
	}
	if m.certTTL == 0 {
		m.certTTL = pki.DefaultTTL
	}
	m.instance = randomHex(8)
	m.metrics = newMetrics(m)
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
		m.leaderSince.Store(int64(time.Since(m.started)))
	}
	m.leader.Store(b)
}

// leadingFor is how long this manager has led (monotonic).
func (m *Manager) leadingFor() time.Duration {
	return time.Since(m.started) - time.Duration(m.leaderSince.Load())
}

// Events is the manager's event broker.
func (m *Manager) Events() *events.Broker { return m.events }

// queueWorkers is how many VMs the manager works on at once. A run at
// 1,000 hosts with 24 saw etcd time out during the creates and the hosts
// fence themselves (on a machine losing a fifth of its CPU to its own
// host: not proven the cause, but not worth the risk).
const queueWorkers = 8

// failoverWorkers are more workers, only for the VMs of dead hosts (urgent
// on the queue): those VMs wait, each of them down, while routine work
// does not; a dead host's 20 VMs move in one wave, not three
// (docs/scale.md). Workers mostly wait on the store and on hosts.
const failoverWorkers = 16

// Run does the manager's own work until ctx ends: it acts on host events
// through the work queue, follows the other managers' hosts and events (when
// sharing), and retries lock releases. It returns when all of that stopped.
func (m *Manager) Run(ctx context.Context) {
	defer m.locks.close()
	var wg sync.WaitGroup
	run := func(f func(context.Context)) {
		wg.Add(1)
		go func() { defer wg.Done(); f(ctx) }()
	}
	run(func(ctx context.Context) { m.queue.Run(ctx, queueWorkers, m.work) })
	run(m.janitor)
	run(m.releaseKeptLocks)
	run(m.watchTokens)
	run(m.watchRecords)
	run(m.auditWriter)
	run(m.syncImages)
	if m.bootCfg != nil {
		run(m.runBoot)
	}
	run(m.runRollouts)
	if m.identity != nil {
		run(func(ctx context.Context) { m.identity.KeepRenewed(ctx, m.log) })
	}
	if m.share != nil {
		run(m.WatchHosts)
		run(m.ShareEvents)
	}
	wg.Wait()
}

// Lead runs what only the leading manager does, until ctx ends: a look at
// every VM every resync period, and the watch for dead hosts. It returns
// when both stopped, so a manager that loses and regains leadership never
// runs two sets of controllers.
func (m *Manager) Lead(ctx context.Context) {
	var wg sync.WaitGroup
	wg.Add(3)
	go func() { defer wg.Done(); m.resyncLoop(ctx) }()
	go func() { defer wg.Done(); m.WatchHostFailures(ctx) }()
	go func() { defer wg.Done(); m.pushNetworksLoop(ctx) }()
	wg.Wait()
}

func (m *Manager) resyncLoop(ctx context.Context) {
	t := time.NewTicker(m.resync)
	defer t.Stop()
	for {
		m.enqueueAll(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// enqueueAll puts on the work queue every VM that needs work, by the
// reconciler's own rule (verdict) over the cached records and what the
// hosts last reported; without a current cache, every VM. A VM with an
// operation in its record always goes (only its lock tells whether it
// was left behind).
func (m *Manager) enqueueAll(ctx context.Context) {
	if rs, ok := m.cache.snapshot(); ok {
		for _, s := range rs {
			if s.rec.Op != nil {
				m.queue.Add(s.rec.Spec.Name)
				continue
			}
			if what, _, _ := m.verdict(s.rec, m.actual(s.rec)); what != settleNothing {
				m.queue.Add(s.rec.Spec.Name)
			}
		}
		return
	}
	rs, err := m.records(ctx)
	if err != nil {
		m.log.Warn("resync: list vms", "err", err)
		return
	}
	for _, r := range rs {
		m.queue.Add(r.rec.Spec.Name)
	}
}

// janitor retries the release of locks whose release failed.
func (m *Manager) janitor(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case l := <-m.unreleased:
			for ctx.Err() == nil {
				uctx, cancel := context.WithTimeout(ctx, 5*time.Second)
				err := m.store.Unlock(uctx, l)
				cancel()
				if err == nil {
					break
				}
				select {
				case <-ctx.Done():
				case <-time.After(time.Second):
				}
			}
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
	o, err := m.define(ctx, req, policy)
	if err != nil {
		return api.VM{}, err
	}
	ctx, cancel := detach(ctx)
	defer cancel()
	defer o.end(ctx)
	r := o.r
	// The host picks the endpoint's port on its own loopback, avoiding the
	// ports of the cluster's other VMs (hosts of a pool may share a machine).
	var avoid []int
	same := map[string]bool{}
	for host := range m.hostNames() {
		same[host] = m.sameMachine(host, r.Host)
	}
	collect := func(s storedRecord) {
		if sm, known := same[s.rec.Host]; s.rec.Spec.HostPort != 0 && (sm || !known) {
			avoid = append(avoid, s.rec.Spec.HostPort)
		}
	}
	if !m.cache.each(collect) {
		if rs, err := m.records(ctx); err == nil {
			for _, s := range rs {
				collect(s)
			}
		}
	}
	res, err := hostproto.Create.Call(ctx, m.hostNamed(r.Host), hostproto.CreateRequest{Spec: r.Spec, AvoidPorts: avoid})
	if err != nil {
		o.deleteRecord(context.WithoutCancel(ctx))
		return api.VM{}, fmt.Errorf("create vm %s on host %s: %w", req.Name, r.Host, err)
	}
	o.r.Spec.HostPort = res.HostPort
	o.publish(api.Event{Type: "vm.created", VM: req.Name, Host: r.Host})
	if !req.Start {
		if err := o.finish(ctx, api.StateStopped, ""); err != nil {
			return api.VM{}, err
		}
		return m.view(o.r), nil
	}
	if err := o.set(api.StateStopped, ""); err != nil {
		return api.VM{}, err
	}
	err = m.start(ctx, o)
	return m.view(o.r), err
}

// define places a new VM and writes its record, in state creating, with
// the VM's lock held for the rest of the create.
func (m *Manager) define(ctx context.Context, req api.VMCreateRequest, policy api.RecoveryPolicy) (*vmOp, error) {
	m.placeMu.Lock()
	defer m.placeMu.Unlock()
	res, err := m.placementReserved(ctx)
	if err != nil {
		return nil, err
	}
	// (A name already taken is refused by beginNew's write, which the
	// store checks; the cache could be a moment behind.)
	cands := m.hosts.candidatesFrom(res.usage, res.recordOf, m.moving)
	hostName, err := place(cands, need{mem: req.MemoryBytes, cpus: req.CPUs, pin: req.Host}, m.overcommit)
	if err != nil {
		return nil, err
	}
	// A VM lives in its host's storage pool when the host has one, so any
	// host of the pool can take it over.
	var pool string
	for _, c := range cands {
		if c.host.Name == hostName {
			pool = c.host.StoragePool
		}
	}
	now := time.Now().UTC()
	spec := hostproto.VMSpec{Name: req.Name, UUID: newUUID(), MemoryBytes: req.MemoryBytes, CPUs: req.CPUs,
		DiskBytes: req.DiskBytes, HangTimeoutSeconds: policy.HangTimeoutSeconds, MinUptimeSeconds: policy.MinUptimeSeconds,
		Pool: pool, Epoch: 1, QGAPort: true, RAMPad: true, Firmware: req.Firmware}
	if err := m.specFromImages(ctx, req, &spec); err != nil {
		return nil, err
	}
	nics, claims, err := m.allocNICs(ctx, req, spec.UUID, hostName)
	if err != nil {
		return nil, err
	}
	spec.NICs = nics
	r := record{
		Spec: spec,
		Host: hostName, Desired: desiredStopped, State: api.StateCreating, CreatedAt: now, UpdatedAt: now, Policy: policy,
	}
	o, err := m.beginNew(ctx, r, opCreate, claims)
	if err == nil {
		m.placed[r.Spec.Name] = placed{rec: storedRecord{o.r, o.rev}, at: time.Now()}
	}
	return o, err
}

// specFromImages fills what a VM made from an image or an ISO needs: the
// image's blob, the disk's size, cloud-init's volume.
func (m *Manager) specFromImages(ctx context.Context, req api.VMCreateRequest, spec *hostproto.VMSpec) error {
	switch {
	case req.Image != "":
		ref, vsize, err := m.resolveImage(ctx, req.Image, false)
		if err != nil {
			return err
		}
		if spec.DiskBytes == 0 {
			spec.DiskBytes = vsize
		}
		if spec.DiskBytes < vsize {
			return errorf(ErrInvalid, "disk %s is smaller than image %s (%s): give --disk %s or more", size(spec.DiskBytes), req.Image, size(vsize), size(vsize))
		}
		spec.Image = ref
		userData := []byte(req.UserData)
		if len(req.SSHKeys) > 0 {
			b, err := cloudinit.UserDataForSSHKeys(req.SSHKeys)
			if err != nil {
				return wrapf(ErrInvalid, err, "--ssh-key")
			}
			userData = b
		}
		if len(userData) > 0 {
			if err := cloudinit.ValidateUserData(userData); err != nil {
				return wrapf(ErrInvalid, err, "user-data")
			}
		}
		// The instance id is the VM's UUID: stable for its life, so
		// cloud-init runs its once-per-instance steps once.
		spec.CloudInit = &hostproto.CloudInit{InstanceID: spec.UUID, UserData: string(userData)}
	case req.ISO != "":
		ref, _, err := m.resolveImage(ctx, req.ISO, true)
		if err != nil {
			return err
		}
		spec.ISO = ref
	}
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
	res, err := hostproto.Exec.Call(ctx, m.hostNamed(vm.Host), hostproto.ExecRequest{VM: name, Exec: req})
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
	return hostproto.Console.Stream(ctx, m.hostNamed(vm.Host), hostproto.ConsoleRequest{VM: name, Follow: follow}, w)
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

// actual is what the VM's host last reported of it (not running when the
// host does not know it).
func (m *Manager) actual(r record) hostproto.VMStatus {
	st, ok := m.hostNamed(r.Host).Status(r.Spec.Name)
	if !ok {
		return hostproto.VMStatus{Name: r.Spec.Name}
	}
	return st
}

// view merges the stored record with what the host reports.
func (m *Manager) view(r record) api.VM {
	st := m.actual(r)
	v := api.VM{
		Name: r.Spec.Name, State: r.State, Host: r.Host, MemoryBytes: r.Spec.MemoryBytes, CPUs: r.Spec.CPUs,
		DiskBytes: r.Spec.DiskBytes, Endpoint: endpointOf(r.Spec),
		NICs: nicViews(r.Spec.NICs), Publish: publishViews(r.Spec.NICs),
		CreatedAt: r.CreatedAt, Message: r.Message, CurrentSnapshot: r.CurrentSnapshot, LastOperation: r.LastOperation,
		Policy: withDefaults(r.Policy), Condition: r.Condition, StoragePool: r.Spec.Pool, Firmware: r.Spec.Firmware,
	}
	if r.Spec.Image != nil {
		v.Image = r.Spec.Image.Name
	}
	if r.Spec.ISO != nil {
		v.ISO = r.Spec.ISO.Name
	}
	if st.Running {
		v.PID = st.PID
		v.Guest = st.Guest
	}
	v.Protection = m.protectionView(r, st)
	return v
}

func newUUID() string {
	var b [16]byte
	rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}
