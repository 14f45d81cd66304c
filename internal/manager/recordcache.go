package manager

import (
	"context"
	"encoding/json"
	"net"
	"sort"
	"strings"
	"sync"
	"time"
)

// recordCache mirrors every VM record ("vms/") in memory, fed by a watch,
// on every manager. The periodic passes (the resync that finds VMs needing
// work, the failure watch, the protection pass) and the read-only views of
// the whole cluster (metrics, host reservations) read it instead of the
// store: at tens of thousands of VMs a pass over the store every half
// second was the first thing to break (docs/scale.md). Anything that acts
// on a VM still reads its record afresh, under its lock.
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
	if c.dirty || c.sorted == nil {
		out := make([]storedRecord, 0, len(c.byName))
		for _, s := range c.byName {
			out = append(out, s)
		}
		sort.Slice(out, func(i, j int) bool { return out[i].rec.Spec.Name < out[j].rec.Spec.Name })
		c.sorted, c.dirty = out, false
	}
	return c.sorted, true
}

func (c *recordCache) apply(log func(string, ...any), key string, value []byte, rev int64) {
	name := strings.TrimPrefix(key, "vms/")
	c.mu.Lock()
	defer c.mu.Unlock()
	c.dirty = true
	if value == nil {
		delete(c.byName, name)
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
	c.byName[name] = storedRecord{r, rev}
}

// watchRecords keeps the cache in step with the store until ctx ends.
func (m *Manager) watchRecords(ctx context.Context) {
	c := m.cache
	for ctx.Err() == nil {
		fresh := map[string]storedRecord{}
		rev, err := m.store.Scan(ctx, "vms/", func(key string, value []byte, rev int64) {
			var r record
			if json.Unmarshal(value, &r) == nil {
				fresh[strings.TrimPrefix(key, "vms/")] = storedRecord{r, rev}
			}
		})
		if err == nil {
			c.mu.Lock()
			c.byName, c.ready, c.dirty = fresh, true, true
			c.mu.Unlock()
			err = m.store.Watch(ctx, "vms/", rev+1, func(key string, value []byte, rev int64) {
				c.apply(m.log.Error, key, value, rev)
			})
		}
		c.mu.Lock()
		c.ready = false // until the next scan: what it holds may miss changes
		c.mu.Unlock()
		if err != nil && ctx.Err() == nil {
			m.log.Warn("watch vm records", "err", err)
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
		}
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

// revOf is the revision of vm's cached record, and where it is.
func (c *recordCache) revOf(name string) (int64, string, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	s, ok := c.byName[name]
	return s.rev, s.rec.Host, ok
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
func (m *Manager) pruneMoving() {
	for name, res := range m.moving {
		if res.arrived.IsZero() {
			continue
		}
		if _, host, ok := m.cache.revOf(name); !ok || host == res.host || time.Since(res.arrived) > time.Minute {
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

// placementRecords gives placement (called with placeMu held) the records
// to weigh: the cache when it is current, with the VMs this manager just
// defined that it does not show yet; else the store.
func (m *Manager) placementRecords(ctx context.Context) (func(f func(storedRecord)), error) {
	fromStore := func() (func(f func(storedRecord)), error) {
		rs, err := m.records(ctx)
		if err != nil {
			return nil, err
		}
		return func(f func(storedRecord)) {
			for _, s := range rs {
				f(s)
			}
		}, nil
	}
	if !m.cache.isReady() {
		return fromStore()
	}
	m.pruneMoving()
	var extra []storedRecord
	for name, p := range m.placed {
		rev, _, ok := m.cache.revOf(name)
		switch {
		case ok && rev >= p.rec.rev || time.Since(p.at) > time.Minute:
			delete(m.placed, name)
		default:
			extra = append(extra, p.rec)
		}
	}
	return func(f func(storedRecord)) {
		if !m.cache.each(f) {
			// The watch restarted meanwhile: the store, then (counted
			// twice at worst, which errs on the safe side) the overlay.
			if rs, err := m.records(ctx); err == nil {
				for _, s := range rs {
					f(s)
				}
			}
		}
		for _, s := range extra {
			f(s)
		}
	}, nil
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
