package manager

import (
	"context"
	"encoding/json"
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
