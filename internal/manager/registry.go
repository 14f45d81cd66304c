package manager

import (
	"context"
	"io"
	"sort"
	"sync"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/hostproto"
)

// registry holds the hosts the manager can place VMs on.
type registry struct {
	mu    sync.Mutex
	hosts map[string]*hostEntry
}

type hostEntry struct {
	h       Host
	enabled bool
}

func newRegistry() *registry { return &registry{hosts: map[string]*hostEntry{}} }

// AddHost registers (or replaces) a host.
func (m *Manager) AddHost(h Host) {
	m.hosts.mu.Lock()
	defer m.hosts.mu.Unlock()
	e, ok := m.hosts.hosts[h.Name()]
	if !ok {
		e = &hostEntry{enabled: true}
		m.hosts.hosts[h.Name()] = e
	}
	e.h = h
}

// setDrained keeps new VMs off a host (or lets them on again).
func (m *Manager) setDrained(name string, drained bool) {
	m.hosts.mu.Lock()
	defer m.hosts.mu.Unlock()
	if e, ok := m.hosts.hosts[name]; ok {
		e.enabled = !drained
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

func (r *registry) list() []api.Host {
	r.mu.Lock()
	entries := make([]*hostEntry, 0, len(r.hosts))
	for _, e := range r.hosts {
		entries = append(entries, e)
	}
	r.mu.Unlock()
	out := make([]api.Host, 0, len(entries))
	for _, e := range entries {
		info := e.h.Info()
		info.Drained = !e.enabled
		out = append(out, info)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// candidates describes every host with what its VMs reserve.
func (r *registry) candidates(rs []storedRecord) []candidate {
	r.mu.Lock()
	defer r.mu.Unlock()
	byName := map[string]*candidate{}
	var out []candidate
	for name, e := range r.hosts {
		byName[name] = &candidate{host: e.h.Info(), enabled: e.enabled}
	}
	for _, s := range rs {
		if c, ok := byName[s.rec.Host]; ok {
			// Memory is reserved for every defined VM, running or not: a
			// stopped VM must be able to start again where it lives. vCPUs
			// are time-shared and only count while the VM is meant to run.
			c.usedMemory += s.rec.Spec.MemoryBytes
			if s.rec.Desired == desiredRunning || s.rec.Desired == desiredPaused {
				c.usedCPUs += s.rec.Spec.CPUs
			}
		}
	}
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
	return api.Host{Name: string(h), State: "unknown", LastHeartbeat: time.Time{}}
}
func (h missingHost) Create(context.Context, hostproto.VMSpec) error { return h.err() }
func (h missingHost) Start(context.Context, string) error            { return h.err() }
func (h missingHost) Stop(context.Context, string, bool, time.Duration) error {
	return h.err()
}
func (h missingHost) Delete(context.Context, string) error { return h.err() }
func (h missingHost) Status(string) (hostproto.VMStatus, error) {
	return hostproto.VMStatus{}, h.err()
}
func (h missingHost) Console(context.Context, string, bool, io.Writer) error { return h.err() }
func (h missingHost) Pause(context.Context, string) error                    { return h.err() }
func (h missingHost) Resume(context.Context, string) error                   { return h.err() }
func (h missingHost) Suspend(context.Context, string) (hostproto.SaveResult, error) {
	return hostproto.SaveResult{}, h.err()
}
func (h missingHost) DiscardState(string) error { return h.err() }
func (h missingHost) SnapshotCreate(context.Context, string, string, bool) (hostproto.SaveResult, error) {
	return hostproto.SaveResult{}, h.err()
}
func (h missingHost) SnapshotRevert(context.Context, string, string, bool) error { return h.err() }
func (h missingHost) SnapshotDelete(context.Context, string, string) error       { return h.err() }
func (h missingHost) SnapshotSpace(string) (map[string]int64, error)             { return nil, h.err() }
func (h missingHost) Exec(context.Context, string, api.ExecRequest) (api.ExecResult, error) {
	return api.ExecResult{}, h.err()
}
func (h missingHost) Restart(context.Context, string) error          { return h.err() }
func (h missingHost) Attach(context.Context, hostproto.VMSpec) error { return h.err() }
func (h missingHost) MigrateIn(context.Context, hostproto.VMSpec) (string, error) {
	return "", h.err()
}
func (h missingHost) MigrateOut(context.Context, string, string) (hostproto.Migration, error) {
	return hostproto.Migration{}, h.err()
}
func (h missingHost) MigrateFinish(context.Context, string) error { return h.err() }
func (h missingHost) MigrateAbort(context.Context, string) error  { return h.err() }
func (h missingHost) SetHealth(string, int, int) error            { return h.err() }
func (h missingHost) Fault(context.Context, string, string) error { return h.err() }

var _ Host = missingHost("")
