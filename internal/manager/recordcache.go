package manager

import (
	"context"
	"encoding/json"
	"log/slog"
	"net"
	"sort"
	"strings"
	"sync"
	"time"
)

// recordCache mirrors every VM record ("vms/") in memory, fed by a watch,
// on every manager. The periodic passes (the resync that finds VMs needing
// work, the failure watch, the protection pass) and the read-only views of
// the whole cluster (listings, metrics, host reservations: once it caught
// up with the store) read it instead of the store: at tens of thousands of
// VMs a pass over the store every half second was the first thing to
// break (docs/scale.md). Anything that acts on a VM still reads its record
// afresh, under its lock.
type recordCache struct {
	mu     sync.Mutex
	byName map[string]storedRecord
	ready  bool // a scan completed and the watch runs
	// sorted is byName in name order, made again only after a change:
	// the passes read it every half second, and copying tens of thousands
	// of records each time was most of an idle manager's work. Readers
	// share it and must not change it.
	sorted []storedRecord
	dirty  bool
	// usage is what the cached records reserve on each host, kept with
	// every change: placement reads it instead of walking every record
	// for every VM it places (at 20,000 VMs a dead host's VMs waited on
	// one another's walks for most of a second).
	usage map[string]hostUsage
	// rev is a revision up to which the cache holds every change: the
	// scan's, then just below each change's, and what etcd's progress
	// reports say. advanced is closed (and dropped) when it grows.
	rev      int64
	advanced chan struct{}
}

// snapshot is every cached record in name order (shared: read only), or
// false before the first scan completed (or while the watch is being
// re-established).
func (c *recordCache) snapshot() ([]storedRecord, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.ready {
		return nil, false
	}
	return c.sortedLocked(), true
}

func (c *recordCache) sortedLocked() []storedRecord {
	if c.dirty || c.sorted == nil {
		out := make([]storedRecord, 0, len(c.byName))
		for _, s := range c.byName {
			out = append(out, s)
		}
		sort.Slice(out, func(i, j int) bool { return out[i].rec.Spec.Name < out[j].rec.Spec.Name })
		c.sorted, c.dirty = out, false
	}
	return c.sorted
}

// at is snapshot once the cache holds every change up to rev. Until then
// it says false, with a channel closed when the cache moves on (nil while
// the cache is not current: nothing to wait for).
func (c *recordCache) at(rev int64) ([]storedRecord, bool, <-chan struct{}) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.ready {
		return nil, false, nil
	}
	if c.rev >= rev {
		return c.sortedLocked(), true, nil
	}
	if c.advanced == nil {
		c.advanced = make(chan struct{})
	}
	return nil, false, c.advanced
}

// seenLocked notes that the cache holds every change up to rev.
func (c *recordCache) seenLocked(rev int64) {
	if rev <= c.rev {
		return
	}
	c.rev = rev
	if c.advanced != nil {
		close(c.advanced)
		c.advanced = nil
	}
}

// progress notes etcd's word that the watch delivered every change up to
// rev.
func (c *recordCache) progress(rev int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.seenLocked(rev)
}

func (c *recordCache) apply(log func(string, ...any), key string, value []byte, rev int64) {
	name := strings.TrimPrefix(key, "vms/")
	c.mu.Lock()
	defer c.mu.Unlock()
	// Every change before this one was delivered before it; not this
	// revision itself: a transaction's other changes may follow.
	defer c.seenLocked(rev - 1)
	c.dirty = true
	if value == nil {
		c.setLocked(name, nil)
		return
	}
	if old, ok := c.byName[name]; ok && old.rev >= rev {
		return
	}
	var r record
	if err := json.Unmarshal(value, &r); err != nil {
		log("skipping unreadable vm record", "key", key, "err", err)
		return
	}
	c.setLocked(name, &storedRecord{r, rev})
}

// setLocked stores (or with nil removes) one record, and what it reserves.
func (c *recordCache) setLocked(name string, s *storedRecord) {
	if c.usage == nil {
		c.usage = map[string]hostUsage{}
	}
	if old, ok := c.byName[name]; ok {
		reserve(c.usage, old.rec, -1)
		delete(c.byName, name)
	}
	if s != nil {
		c.byName[name] = *s
		reserve(c.usage, s.rec, 1)
	}
	c.dirty = true
}

// reload replaces every record (a fresh scan at rev), and what they
// reserve.
func (c *recordCache) reload(fresh map[string]storedRecord, rev int64) {
	usage := map[string]hostUsage{}
	for _, s := range fresh {
		reserve(usage, s.rec, 1)
	}
	c.mu.Lock()
	c.byName, c.usage, c.ready, c.dirty = fresh, usage, true, true
	c.seenLocked(rev)
	c.mu.Unlock()
}

// watchRecords keeps the cache in step with the store until ctx ends.
func (m *Manager) watchRecords(ctx context.Context) {
	c := m.cache
	scan := func(ctx context.Context) (map[string]storedRecord, int64, error) {
		fresh := map[string]storedRecord{}
		rev, err := m.store.Scan(ctx, "vms/", func(key string, value []byte, rev int64) {
			var r record
			if json.Unmarshal(value, &r) == nil {
				fresh[strings.TrimPrefix(key, "vms/")] = storedRecord{r, rev}
			}
		})
		return fresh, rev, err
	}
	watch := func(ctx context.Context, from int64) error {
		return m.store.WatchProgress(ctx, "vms/", from, func(key string, value []byte, rev int64) {
			c.apply(m.log.Error, key, value, rev)
		}, c.progress)
	}
	c.follow(ctx, scan, watch, m.log, time.Second)
}

// follow fills the cache with a scan and keeps it in step with watch, from
// the revision after the scan's. A watch that ends without an error (etcd's
// client closes a watch the server cancelled, with no word of why) is taken
// up again from the revision the cache holds, which repeats at most that
// revision's changes, to the same effect: at 20,000 VMs a new scan is 8 MB
// read and decoded, and the cache is not current meanwhile, and during a
// burst of creates this happened every 10 to 25 s. A watch that fails
// (the history it needs was compacted, the store is gone) means a new
// scan, retry later apart.
func (c *recordCache) follow(ctx context.Context, scan func(context.Context) (map[string]storedRecord, int64, error),
	watch func(ctx context.Context, from int64) error, log *slog.Logger, retry time.Duration) {
	from := int64(0) // 0: scan first
	for ctx.Err() == nil {
		if from == 0 {
			fresh, rev, err := scan(ctx)
			if err != nil {
				if ctx.Err() == nil {
					log.Warn("scan vm records", "err", err)
				}
				sleep(ctx, retry)
				continue
			}
			c.reload(fresh, rev)
			from = rev + 1
		}
		t0 := time.Now()
		err := watch(ctx, from)
		if ctx.Err() != nil {
			break
		}
		if err == nil {
			from = c.revision() + 1
			log.Warn("etcd ended the watch of vm records without an error: taken up again", "from", from)
			if time.Since(t0) < retry {
				sleep(ctx, retry) // a watch that cannot start (a closed client) must not spin
			}
			continue
		}
		c.mu.Lock()
		c.ready = false // until the next scan: what it holds may miss changes
		c.mu.Unlock()
		log.Warn("watch vm records", "err", err)
		from = 0
		sleep(ctx, retry)
	}
	c.mu.Lock()
	c.ready = false
	c.mu.Unlock()
}

// revision is the revision up to which the cache holds every change.
func (c *recordCache) revision() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.rev
}

func sleep(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}

// cachedRecords is every VM record, from the cache when it is current,
// else from the store.
func (m *Manager) cachedRecords(ctx context.Context) ([]storedRecord, error) {
	if rs, ok := m.cache.snapshot(); ok {
		return rs, nil
	}
	return m.records(ctx)
}

// currentAnswer bounds how long currentRecords waits on the store before
// it serves the mirror as it stands.
const currentAnswer = 2 * time.Second

// currentRecords is every VM record with every change the store
// acknowledged before the call: the mirror once it caught up
// (consistentRecords), else the store. The API's cluster-wide views read
// it, so that a VM created or stopped just before shows in the next one;
// the periodic passes make do with cachedRecords. A store that does not
// answer within currentAnswer (a lost quorum blocks reads) gets the mirror
// as it stands: the metrics and the host list matter most then, and
// stale reservations are better than none. stale says so.
func (m *Manager) currentRecords(ctx context.Context) (rs []storedRecord, stale bool, err error) {
	cctx, cancel := context.WithTimeout(ctx, currentAnswer)
	defer cancel()
	if rs, ok := m.consistentRecords(cctx); ok {
		return rs, false, nil
	}
	rs, err = m.records(cctx)
	if err == nil {
		return rs, false, nil
	}
	if cached, ok := m.cache.snapshot(); ok && ctx.Err() == nil {
		return cached, true, nil
	}
	return nil, false, err
}

// isReady says whether the cache is current (a scan completed and the
// watch runs).
func (c *recordCache) isReady() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.ready
}

// pruneMoving drops the rooms held for VMs whose move ended once the
// mirror shows them where they went, or a minute after (a failed move).
// Called with placeMu held.
func (m *Manager) pruneMoving(recs map[string]storedRecord) {
	for name, res := range m.moving {
		if res.arrived.IsZero() {
			continue
		}
		if s, ok := recs[name]; !ok || s.rec.Host == res.host || time.Since(res.arrived) > time.Minute {
			delete(m.moving, name)
		}
	}
}

// placed are the VMs this manager defined that its cache may not show yet
// (guarded by placeMu): placement must count them, or two creates in a row
// could both take a host's last room.
type placed struct {
	rec storedRecord
	at  time.Time
}

// each calls f with every cached record, in no order, with the cache
// locked (f must not call the cache), and says false when the cache is
// not current. Nothing is copied: placement runs it for every create.
func (c *recordCache) each(f func(storedRecord)) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.ready {
		return false
	}
	for _, s := range c.byName {
		f(s)
	}
	return true
}

// reserved is what placement weighs: what the VMs reserve on each host
// (usage, the caller's to change), and the record of a VM on its way
// somewhere as usage counts it.
type reserved struct {
	usage    map[string]hostUsage
	recordOf func(name string) (record, bool)
}

// placementReserved gives placement (called with placeMu held) what the VMs
// reserve: from the cache when it is current, with the VMs this manager
// just defined that it does not show yet; else from the store.
//
// The sums and the records of the VMs on their way or just defined are
// read in one moment: a record the watch applied after the sums were
// copied would let placement drop a reservation the sums do not show yet.
func (m *Manager) placementReserved(ctx context.Context) (reserved, error) {
	names := make([]string, 0, len(m.moving)+len(m.placed))
	for name := range m.moving {
		names = append(names, name)
	}
	for name := range m.placed {
		names = append(names, name)
	}
	if usage, recs, ok := m.cache.usageWith(names); ok {
		m.pruneMoving(recs)
		extra := map[string]record{}
		for name, p := range m.placed {
			s, ok := recs[name]
			switch {
			case ok && s.rev >= p.rec.rev || time.Since(p.at) > time.Minute:
				delete(m.placed, name)
			default:
				// Counted twice if the mirror has an older version of it,
				// which errs on the safe side.
				extra[name] = p.rec.rec
				reserve(usage, p.rec.rec, 1)
			}
		}
		return reserved{usage, func(name string) (record, bool) {
			if r, ok := extra[name]; ok {
				return r, true
			}
			s, ok := recs[name]
			return s.rec, ok
		}}, nil
	}
	rs, err := m.records(ctx)
	if err != nil {
		return reserved{}, err
	}
	usage, recs := map[string]hostUsage{}, map[string]record{}
	for _, s := range rs {
		reserve(usage, s.rec, 1)
		recs[s.rec.Spec.Name] = s.rec
	}
	return reserved{usage, func(name string) (record, bool) { r, ok := recs[name]; return r, ok }}, nil
}

// usageCopy is what the cached records reserve on each host (a copy), or
// false while the cache is not current.
func (c *recordCache) usageCopy() (map[string]hostUsage, bool) {
	u, _, ok := c.usageWith(nil)
	return u, ok
}

// usageWith is usageCopy with the cached records of names (those it has),
// all as of one moment.
func (c *recordCache) usageWith(names []string) (map[string]hostUsage, map[string]storedRecord, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.ready {
		return nil, nil, false
	}
	out := make(map[string]hostUsage, len(c.usage))
	for h, u := range c.usage {
		out[h] = u
	}
	recs := make(map[string]storedRecord, len(names))
	for _, name := range names {
		if s, ok := c.byName[name]; ok {
			recs[name] = s
		}
	}
	return out, recs, true
}

// sameMachine says whether hosts a and b run on one machine (the same
// address), where their VMs' forwarded ports share one loopback; unknown
// addresses count as the same.
func (m *Manager) sameMachine(a, b string) bool {
	ra, rb := m.remote(a), m.remote(b)
	if ra == nil || rb == nil {
		return true
	}
	ha, _, err1 := net.SplitHostPort(ra.Addr())
	hb, _, err2 := net.SplitHostPort(rb.Addr())
	return err1 != nil || err2 != nil || ha == hb
}

// hostNames are the names of the hosts this manager knows.
func (m *Manager) hostNames() map[string]bool {
	m.hosts.mu.Lock()
	defer m.hosts.mu.Unlock()
	out := make(map[string]bool, len(m.hosts.hosts))
	for name := range m.hosts.hosts {
		out[name] = true
	}
	return out
}
