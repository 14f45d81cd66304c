package manager

import (
	"context"
	"errors"
	"slices"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/hostproto"
	"github.com/vigil-project/vigil/internal/store"
)

// A heartbeat is stored in two records. "hostseen/<name>" (a few dozen
// bytes) is written on every heartbeat: it is the host's liveness, shared by
// every manager, and the record declareDead conditions on. "hoststatus/<name>"
// (every VM's status: about 10 KB with 20 VMs) is written only when what a
// decision reads in it changed, or every statusRefresh for the rest (usage
// counters, the guest's last heartbeat, checkpoint figures): at 1,000 hosts
// writing every status every second was 10 MB/s into etcd. The manager that
// takes the heartbeats has them fresh in memory; the others see those
// figures at most statusRefresh old.

// statusRefresh is how old the stored status may grow while nothing a
// decision reads in it changes.
const statusRefresh = 30 * time.Second

// hostSeenRecord is a host's liveness, under "hostseen/<name>".
type hostSeenRecord struct {
	Seen time.Time `json:"seen"`
}

// storedStatus is what this manager knows of a host's stored status: its
// report as stored, and when this manager stored or saw it.
type storedStatus struct {
	hb hostproto.Heartbeat
	at time.Time
}

// storeHeartbeat shares a heartbeat through the store, if the host's record
// is still the one at hostRev (so a death and a heartbeat cannot both
// win): its liveness always, its status when statusDue says so. It returns
// the revision written, and whether the status was written with it.
func (m *Manager) storeHeartbeat(ctx context.Context, name string, hostRev int64, hb hostproto.Heartbeat, now time.Time) (int64, bool, error) {
	pairs := []store.Pair{{Key: "hostseen/" + name, Value: hostSeenRecord{Seen: now}}}
	withStatus := m.statusDue(name, hb, time.Now())
	if withStatus {
		pairs = append(pairs, store.Pair{Key: "hoststatus/" + name, Value: hostStatusRecord{Heartbeat: hb, Seen: now}})
	}
	rev, err := m.store.PutAllIf(ctx, "hosts/"+name, hostRev, pairs...)
	if err != nil {
		return 0, false, err
	}
	if withStatus {
		m.noteStored(name, hb, rev)
	}
	return rev, withStatus, nil
}

// statusDue says whether a heartbeat's status must be stored now.
func (m *Manager) statusDue(name string, hb hostproto.Heartbeat, now time.Time) bool {
	m.hosts.mu.Lock()
	defer m.hosts.mu.Unlock()
	e, ok := m.hosts.hosts[name]
	if !ok || e.stored.at.IsZero() || now.Sub(e.stored.at) >= statusRefresh {
		return true
	}
	return !sameReport(e.stored.hb, hb)
}

// noteStored remembers a host's status as stored at rev (by this manager or,
// seen through the watch, by another), unless newer news is known.
func (m *Manager) noteStored(name string, hb hostproto.Heartbeat, rev int64) {
	m.hosts.mu.Lock()
	defer m.hosts.mu.Unlock()
	e, ok := m.hosts.hosts[name]
	if !ok || rev < e.storedRev {
		return
	}
	hb.Events = nil
	e.stored, e.storedRev = storedStatus{hb: hb, at: time.Now()}, rev
}

// sameReport says whether two reports of a host agree on everything a
// decision reads: the host's capacity and every VM's state, process, guest
// identity and protection state. Counters and times that move with every
// heartbeat are left out.
func sameReport(a, b hostproto.Heartbeat) bool {
	return stableInfo(a.Info) == stableInfo(b.Info) &&
		slices.EqualFunc(a.Statuses, b.Statuses, sameVMStatus)
}

func stableInfo(h api.Host) api.Host {
	h.State, h.LastHeartbeat, h.VMs = "", time.Time{}, 0
	h.ReservedMemoryBytes, h.ReservedCPUs, h.Drained = 0, 0, false
	return h
}

func sameVMStatus(a, b hostproto.VMStatus) bool {
	if a.Name != b.Name || a.Running != b.Running || a.PID != b.PID || a.RunState != b.RunState ||
		!a.StartedAt.Equal(b.StartedAt) || a.SavedState != b.SavedState || a.Busy != b.Busy {
		return false
	}
	if (a.Guest == nil) != (b.Guest == nil) || (a.Protection == nil) != (b.Protection == nil) {
		return false
	}
	if g, h := a.Guest, b.Guest; g != nil && (g.BootID != h.BootID || g.Agent != h.Agent ||
		g.OS != h.OS || g.Hostname != h.Hostname || !slices.Equal(g.Addresses, h.Addresses)) {
		return false
	}
	if p, q := a.Protection, b.Protection; p != nil && (p.Secondary != q.Secondary ||
		p.Generation != q.Generation || p.State != q.State || p.Error != q.Error || p.Run != q.Run) {
		return false
	}
	return true
}

// hostRecordRev is the revision of the host's record as this manager last
// saw it (0 if unknown), so that a heartbeat need not read it.
func (m *Manager) hostRecordRev(name string) int64 {
	m.hosts.mu.Lock()
	defer m.hosts.mu.Unlock()
	if e, ok := m.hosts.hosts[name]; ok {
		return e.recordRev
	}
	return 0
}

func (m *Manager) setRecordRev(name string, rev int64) {
	m.hosts.mu.Lock()
	defer m.hosts.mu.Unlock()
	if e, ok := m.hosts.hosts[name]; ok && rev > e.recordRev {
		e.recordRev = rev
	}
}

// shareHeartbeat stores a heartbeat, conditioned on the host's record as
// last seen here; if that changed (or was not known), it reads the record
// again and retries once. A host declared dead gets errDead with the time.
func (m *Manager) shareHeartbeat(ctx context.Context, name string, hb hostproto.Heartbeat, now time.Time) (int64, bool, error) {
	if rev := m.hostRecordRev(name); rev != 0 {
		srev, withStatus, err := m.storeHeartbeat(ctx, name, rev, hb, now)
		if !errors.Is(err, store.ErrConflict) {
			return srev, withStatus, err
		}
	}
	var rec hostRecord
	rev, err := m.store.Get(ctx, "hosts/"+name, &rec)
	if err != nil {
		return 0, false, err
	}
	if rec.DeadAt != nil {
		return 0, false, &deadError{at: *rec.DeadAt}
	}
	m.setRecordRev(name, rev)
	return m.storeHeartbeat(ctx, name, rev, hb, now)
}

// deadError says the host was declared dead at a time.
type deadError struct{ at time.Time }

func (e *deadError) Error() string { return "host declared dead at " + e.at.Format(time.RFC3339Nano) }
