package manager

import (
	"context"
	"io"
	"sort"
	"sync"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/hostproto"
	"github.com/vigil-project/vigil/internal/remotehost"
)

// Host is a host agent as the manager sees it: a connection that carries
// the host operations (declared in hostproto), and what the host last
// reported. The dev agent's in-process host (LocalHost) and a remote one
// (remotehost.Host) both implement it; nothing in the manager needs to know
// which one it has.
type Host interface {
	hostproto.Conn
	Name() string
	// Info is the host's capacity, and "up" or "down" by its heartbeats.
	Info() api.Host
	// Status is what the host last reported of one of its VMs.
	Status(vm string) (hostproto.VMStatus, bool)
	// HeardAt is when this manager last heard from the host, on the
	// monotonic clock.
	HeardAt() time.Time
}

var _ Host = (*remotehost.Host)(nil)

// LocalHost makes an in-process host agent a Host: calls go straight to
// it, and it is always heard from.
func LocalHost(name string, h hostproto.Handler) Host {
	return localHost{name: name, conn: hostproto.Local(h)}
}

type localHost struct {
	name string
	conn hostproto.Conn
}

func (l localHost) Name() string { return l.name }
func (l localHost) Call(ctx context.Context, op string, req, resp any) error {
	return l.conn.Call(ctx, op, req, resp)
}
func (l localHost) Stream(ctx context.Context, op string, req any, w io.Writer) error {
	return l.conn.Stream(ctx, op, req, w)
}
func (l localHost) Tunnel(ctx context.Context, op string, req any) (io.ReadWriteCloser, error) {
	return l.conn.Tunnel(ctx, op, req)
}
func (l localHost) Info() api.Host {
	info, err := hostproto.Info.Call(context.Background(), l.conn, hostproto.None{})
	if err != nil {
		return api.Host{Name: l.name, State: "down"}
	}
	return info
}
func (l localHost) Status(vm string) (hostproto.VMStatus, bool) {
	st, err := hostproto.Status.Call(context.Background(), l.conn, hostproto.VMRef{VM: vm})
	return st, err == nil
}
func (l localHost) HeardAt() time.Time { return time.Now() }

// registry holds the hosts the manager can place VMs on, with what the
// manager itself decided about them (drained, dead).
type registry struct {
	mu    sync.Mutex
	hosts map[string]*hostEntry
}

type hostEntry struct {
	h Host
	// remote is h when it is a remote host: registration and heartbeats
	// feed it. Nothing else looks at the concrete type.
	remote  *remotehost.Host
	drained bool
	// deadAt: the managers declared the host dead (zero while alive).
	deadAt time.Time
	// seenRev is the store revision of the host's liveness record this
	// manager last applied (see declareDead).
	seenRev int64
	// recordRev is the revision of the host's record as last seen here;
	// a heartbeat is stored only if it is still that (see shareHeartbeat).
	recordRev int64
	// stored is the host's status as last stored, and storedRev its
	// revision (see statusDue).
	stored    storedStatus
	storedRev int64
	// declareFailed is when declaring it dead last failed (the store
	// refused): the next try waits a pass (see detectDeaths).
	declareFailed time.Time
	// report is the last numbered report this manager took from the host
	// (its number and statuses): a heartbeat that says Same stands for it.
	report         uint64
	reportStatuses []hostproto.VMStatus
}

func newRegistry() *registry { return &registry{hosts: map[string]*hostEntry{}} }

// AddHost registers (or replaces) a host, keeping what was decided about it.
func (m *Manager) AddHost(h Host) {
	m.hosts.mu.Lock()
	defer m.hosts.mu.Unlock()
	e, ok := m.hosts.hosts[h.Name()]
	if !ok {
		e = &hostEntry{}
		m.hosts.hosts[h.Name()] = e
	}
	e.h = h
	e.remote, _ = h.(*remotehost.Host)
}

// setDrained keeps new VMs off a host (or lets them on again).
func (m *Manager) setDrained(name string, drained bool) {
	m.hosts.mu.Lock()
	defer m.hosts.mu.Unlock()
	if e, ok := m.hosts.hosts[name]; ok {
		e.drained = drained
	}
}

// setDeclareFailed notes when declaring a host dead failed.
func (m *Manager) setDeclareFailed(name string, t time.Time) {
	m.hosts.mu.Lock()
	defer m.hosts.mu.Unlock()
	if e, ok := m.hosts.hosts[name]; ok {
		e.declareFailed = t
	}
}

// setDead records that the host was declared dead at t (zero: it joined
// again).
func (m *Manager) setDead(name string, t time.Time) {
	m.hosts.mu.Lock()
	defer m.hosts.mu.Unlock()
	if e, ok := m.hosts.hosts[name]; ok {
		e.deadAt = t
	}
}

// hostNamed returns the named host, or a stand-in whose every call fails
// with ErrUnavailable, so callers need no nil checks.
func (m *Manager) hostNamed(name string) Host {
	m.hosts.mu.Lock()
	defer m.hosts.mu.Unlock()
	if e, ok := m.hosts.hosts[name]; ok {
		return e.h
	}
	return missingHost(name)
}

// hostState is "up", "down", "dead" or "unknown".
func (m *Manager) hostState(name string) string {
	m.hosts.mu.Lock()
	e, ok := m.hosts.hosts[name]
	var c hostEntry
	if ok {
		c = *e // a copy: the entry changes under the lock
	}
	m.hosts.mu.Unlock()
	if !ok {
		return "unknown"
	}
	return c.view().State
}

func (e *hostEntry) view() api.Host {
	info := e.h.Info()
	info.Drained = e.drained
	if !e.deadAt.IsZero() {
		info.State = "dead"
	}
	return info
}

// entries is a snapshot of the registry, by name.
func (r *registry) entries() []hostEntry {
	r.mu.Lock()
	out := make([]hostEntry, 0, len(r.hosts))
	for _, e := range r.hosts {
		out = append(out, *e)
	}
	r.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].h.Name() < out[j].h.Name() })
	return out
}

func (r *registry) list() []api.Host {
	es := r.entries()
	out := make([]api.Host, 0, len(es))
	for _, e := range es {
		out = append(out, e.view())
	}
	return out
}

// reservation holds room on a host for a VM on its way there (a live
// migration, an evacuation) before its record says so.
type reservation struct {
	host string
	mem  int64
	cpus int
	// arrived is when the move ended: the room stays held until the record
	// mirror shows the VM there (placement reads the mirror, which may lag
	// the record's write), or for a while if the move failed.
	arrived time.Time
}

// hostUsage is what VM records reserve on one host.
type hostUsage struct {
	mem  int64
	cpus int
}

// reserve adds to u (sign 1) or takes from it (sign -1) what r reserves.
// Memory is reserved for every defined VM, running or not: a stopped VM
// must be able to start again where it lives. vCPUs are time-shared and
// only count while the VM is meant to run. A standby holds the VM's memory
// on its secondary: the VM must be able to continue there (candidatesFrom
// takes it back when the VM is on its way there).
func reserve(u map[string]hostUsage, r record, sign int) {
	add := func(host string, mem int64, cpus int) {
		x := u[host]
		x.mem += int64(sign) * mem
		x.cpus += sign * cpus
		if x == (hostUsage{}) {
			delete(u, host)
			return
		}
		u[host] = x
	}
	cpus := 0
	if r.Desired == desiredRunning || r.Desired == desiredPaused {
		cpus = r.Spec.CPUs
	}
	add(r.Host, r.Spec.MemoryBytes, cpus)
	if p := r.Protection; p != nil && p.Secondary != "" && p.Secondary != r.Host {
		add(p.Secondary, r.Spec.MemoryBytes, 0)
	}
}

// candidates describes every host with what its VMs (rs) reserve, and
// what is reserved for VMs on their way.
func (r *registry) candidates(rs []storedRecord, moving map[string]reservation) []candidate {
	usage := map[string]hostUsage{}
	recs := map[string]record{}
	for _, s := range rs {
		reserve(usage, s.rec, 1)
		if _, ok := moving[s.rec.Spec.Name]; ok {
			recs[s.rec.Spec.Name] = s.rec
		}
	}
	return r.candidatesFrom(usage, func(name string) (record, bool) { rec, ok := recs[name]; return rec, ok }, moving)
}

// candidatesFrom describes every host with what usage says its VMs
// reserve, and what is reserved for VMs on their way (moving; recordOf
// gives such a VM's record as usage counts it).
func (r *registry) candidatesFrom(usage map[string]hostUsage, recordOf func(name string) (record, bool), moving map[string]reservation) []candidate {
	byName := map[string]*candidate{}
	for _, e := range r.entries() {
		byName[e.h.Name()] = &candidate{host: e.view(), enabled: !e.drained}
	}
	for host, u := range usage {
		if c, ok := byName[host]; ok {
			c.usedMemory += u.mem
			c.usedCPUs += u.cpus
		}
	}
	for name, res := range moving {
		rec, ok := recordOf(name)
		if !ok {
			continue
		}
		// Not twice when the VM moves to its secondary.
		if p := rec.Protection; p != nil && p.Secondary != "" && p.Secondary != rec.Host && res.host == p.Secondary {
			if c, ok := byName[p.Secondary]; ok {
				c.usedMemory -= rec.Spec.MemoryBytes
			}
		}
		if c, there := byName[res.host]; there && res.host != rec.Host {
			c.usedMemory += res.mem
			c.usedCPUs += res.cpus
		}
	}
	out := make([]candidate, 0, len(byName))
	for _, c := range byName {
		out = append(out, *c)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].host.Name < out[j].host.Name })
	return out
}

// missingHost answers for a host the manager does not know (any more).
type missingHost string

func (h missingHost) err() error {
	return errorf(ErrUnavailable, "host %s is not connected to this manager: see 'vigil host list'", string(h))
}
func (h missingHost) Name() string { return string(h) }
func (h missingHost) Info() api.Host {
	return api.Host{Name: string(h), State: "unknown"}
}
func (h missingHost) Call(context.Context, string, any, any) error { return h.err() }
func (h missingHost) Stream(context.Context, string, any, io.Writer) error {
	return h.err()
}
func (h missingHost) Tunnel(context.Context, string, any) (io.ReadWriteCloser, error) {
	return nil, h.err()
}
func (h missingHost) Status(string) (hostproto.VMStatus, bool) { return hostproto.VMStatus{}, false }
func (h missingHost) HeardAt() time.Time                       { return time.Time{} }

var _ Host = missingHost("")
