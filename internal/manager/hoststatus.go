package manager

import (
	"context"
	"errors"
	"time"

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
// win): its liveness always, its status when statusDue says so or force.
// It returns the revision written, and whether the status was written with
// it.
func (m *Manager) storeHeartbeat(ctx context.Context, name string, hostRev int64, hb hostproto.Heartbeat, now time.Time, force bool) (int64, bool, error) {
	conds := []store.Cond{{Key: "hosts/" + name, Rev: hostRev}}
	pairs := []store.Pair{{Key: "hostseen/" + name, Value: hostSeenRecord{Seen: now}}}
	withStatus, storedRev := true, int64(0)
	if !force {
		withStatus, storedRev = m.statusDue(name, hb, time.Now())
	}
	if withStatus {
		pairs = append(pairs, store.Pair{Key: "hoststatus/" + name, Value: hostStatusRecord{Heartbeat: hb, Seen: now}})
	} else {
		// Left out only while the stored status is the one it was judged
		// against: another manager may have stored a newer one since
		// (the host reported there for a while), which this report must
		// replace.
		conds = append(conds, store.Cond{Key: "hoststatus/" + name, Rev: storedRev})
	}
	rev, err := m.store.PutAllIf(ctx, conds, pairs...)
	if err != nil {
		return 0, false, err
	}
	if withStatus {
		m.noteStored(name, hb, rev)
	}
	return rev, withStatus, nil
}

// statusDue says whether a heartbeat's status must be stored now and, if
// not, the revision of the stored one it matches.
func (m *Manager) statusDue(name string, hb hostproto.Heartbeat, now time.Time) (bool, int64) {
	m.hosts.mu.Lock()
	defer m.hosts.mu.Unlock()
	e, ok := m.hosts.hosts[name]
	if !ok || e.stored.at.IsZero() || e.storedRev == 0 || now.Sub(e.stored.at) >= statusRefresh {
		return true, 0
	}
	return !hostproto.SameReport(e.stored.hb, hb), e.storedRev
}

// heldReport is the statuses of the host's report number n, if it is the
// last this manager took from it.
func (m *Manager) heldReport(name string, n uint64) ([]hostproto.VMStatus, bool) {
	m.hosts.mu.Lock()
	defer m.hosts.mu.Unlock()
	if e, ok := m.hosts.hosts[name]; ok && n != 0 && e.report == n {
		return e.reportStatuses, true
	}
	return nil, false
}

// holdReport keeps the host's report number n, once taken, so that the
// host's next heartbeats may say Same instead of sending it again.
func (m *Manager) holdReport(name string, n uint64, statuses []hostproto.VMStatus) {
	m.hosts.mu.Lock()
	defer m.hosts.mu.Unlock()
	if e, ok := m.hosts.hosts[name]; ok {
		e.report, e.reportStatuses = n, statuses
	}
}

// forgetStored makes the next heartbeat of a host store its status: after
// a registration, the other managers may hold a new, empty view of it.
func (m *Manager) forgetStored(name string) {
	m.hosts.mu.Lock()
	defer m.hosts.mu.Unlock()
	if e, ok := m.hosts.hosts[name]; ok {
		e.stored.at = time.Time{}
	}
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

// hostRecordRev is the revision of the host's record as this manager last
// saw it alive (0 if unknown or dead), so that a heartbeat need not read it.
func (m *Manager) hostRecordRev(name string) int64 {
	m.hosts.mu.Lock()
	defer m.hosts.mu.Unlock()
	if e, ok := m.hosts.hosts[name]; ok && e.deadAt.IsZero() {
		return e.recordRev
	}
	return 0
}

// setLiveRecordRev remembers the revision of a host's record that says it
// lives. Never that of a death: a heartbeat conditioned on it would win.
func (m *Manager) setLiveRecordRev(name string, rev int64) {
	m.hosts.mu.Lock()
	defer m.hosts.mu.Unlock()
	if e, ok := m.hosts.hosts[name]; ok && rev > e.recordRev {
		e.recordRev = rev
	}
}

// shareHeartbeat stores a heartbeat, conditioned on the host's record as
// last seen alive here; if that changed (or was not known), it reads the
// record again and stores the heartbeat with its status. A host declared
// dead gets a deadError.
func (m *Manager) shareHeartbeat(ctx context.Context, name string, hb hostproto.Heartbeat, now time.Time) (int64, bool, error) {
	if rev := m.hostRecordRev(name); rev != 0 {
		srev, withStatus, err := m.storeHeartbeat(ctx, name, rev, hb, now, false)
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
	m.setLiveRecordRev(name, rev)
	return m.storeHeartbeat(ctx, name, rev, hb, now, true)
}

// deadError says the host was declared dead at a time.
type deadError struct{ at time.Time }

func (e *deadError) Error() string { return "host declared dead at " + e.at.Format(time.RFC3339Nano) }
