package manager

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/store"
)

// Every manager serves the event stream, but a host's events reach only the
// manager it talks to, and each manager acts on the requests it serves. So
// that a client following any manager sees everything, managers share their
// events through etcd: each writes what it publishes under
// "events/<time>-<instance>" (kept for eventTTL to 2×eventTTL), and
// republishes what the others wrote. Sequence numbers stay per manager.

const eventTTL = 5 * time.Minute

// sharedEvent is an event one manager shares with the others.
type sharedEvent struct {
	From  string    `json:"from"` // the writing manager's instance id
	Event api.Event `json:"event"`
}

// publish delivers e to this manager's subscribers and queues it for the
// other managers. It never blocks: a full queue drops the shared copy.
func (m *Manager) publish(e api.Event) {
	e = m.events.Publish(e)
	if m.share == nil {
		return
	}
	select {
	case m.share <- e:
	default:
		m.log.Warn("event not shared with other managers: queue full", "type", e.Type, "vm", e.VM)
	}
}

// shareBatch is the most events shared in one write.
const shareBatch = 100

func (m *Manager) sharedPair(e api.Event) store.Pair {
	// Time and sequence make the key unique: two events of one instant
	// must not overwrite each other.
	return store.Pair{Key: fmt.Sprintf("events/%019d-%s-%d", e.Time.UnixNano(), m.instance, e.Seq), Value: sharedEvent{From: m.instance, Event: e}}
}

// ShareEvents writes this manager's events to the store and publishes the
// other managers' until ctx ends. Call it only when sharing was configured.
func (m *Manager) ShareEvents(ctx context.Context) {
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-ctx.Done():
				return
			case e := <-m.share:
				// What queued meanwhile goes in the same write: one write
				// per event fell behind a burst of creates (about 80 a
				// second here) and dropped events.
				batch := []store.Pair{m.sharedPair(e)}
			drain:
				for len(batch) < shareBatch {
					select {
					case e := <-m.share:
						batch = append(batch, m.sharedPair(e))
					default:
						break drain
					}
				}
				if err := m.store.PutTTLAll(ctx, batch, eventTTL); err != nil && ctx.Err() == nil {
					m.log.Warn("share events", "events", len(batch), "err", err)
				}
			}
		}
	}()
	apply := func(_ string, value []byte, _ int64) {
		var se sharedEvent
		if value == nil || json.Unmarshal(value, &se) != nil || se.From == m.instance {
			return
		}
		m.events.Publish(se.Event) // stamped with this manager's sequence
	}
	for ctx.Err() == nil {
		// Start from now: history before this manager started is not
		// replayed (its own ring buffer starts empty too).
		rev, err := m.store.Scan(ctx, "events/", func(string, []byte, int64) {})
		if err == nil {
			err = m.store.Watch(ctx, "events/", rev+1, apply)
		}
		if err != nil && ctx.Err() == nil {
			m.log.Warn("watch shared events", "err", err)
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
		}
	}
}
