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
	mu     sync.RWMutex
	byName map[string]storedRecord
	ready  bool // a scan completed and the watch runs
}

// snapshot is every cached record in name order, or false before the
// first scan completed (or while the watch is being re-established).
func (c *recordCache) snapshot() ([]storedRecord, bool) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if !c.ready {
		return nil, false
	}
	out := make([]storedRecord, 0, len(c.byName))
	for _, s := range c.byName {
		out = append(out, s)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].rec.Spec.Name < out[j].rec.Spec.Name })
	return out, true
}

func (c *recordCache) apply(log func(string, ...any), key string, value []byte, rev int64) {
	name := strings.TrimPrefix(key, "vms/")
	c.mu.Lock()
	defer c.mu.Unlock()
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
			c.byName, c.ready = fresh, true
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

// has says whether the cache holds vm's record.
func (c *recordCache) has(name string) bool {
	c.mu.RLock()
	defer c.mu.RUnlock()
	_, ok := c.byName[name]
	return ok
}

// placed are the VMs this manager defined that its cache may not show yet
// (guarded by placeMu): placement must count them, or two creates in a row
// could both take a host's last room.
type placed struct {
	rec storedRecord
	at  time.Time
}

// placementRecords are the records placement weighs (called with placeMu
// held): the cache when it is current, with the VMs this manager just
// defined that it does not show yet; else the store.
func (m *Manager) placementRecords(ctx context.Context) ([]storedRecord, error) {
	rs, ok := m.cache.snapshot()
	if !ok {
		return m.records(ctx)
	}
	for name, p := range m.placed {
		switch {
		case m.cache.has(name) || time.Since(p.at) > time.Minute:
			delete(m.placed, name)
		default:
			rs = append(rs, p.rec)
		}
	}
	return rs, nil
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
