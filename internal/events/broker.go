// Package events fans lifecycle events out to API clients. It keeps a ring
// of recent events so a client can resume from a sequence number.
package events

import (
	"sync"
	"time"

	"github.com/vigil-project/vigil/api"
)

// Broker publishes events to subscribers. The zero value is not usable; use New.
type Broker struct {
	mu   sync.Mutex
	seq  uint64
	ring []api.Event
	size int
	subs map[*sub]struct{}
}

type sub struct {
	ch chan api.Event
}

// New returns a broker that remembers the last size events.
func New(size int) *Broker {
	return &Broker{size: size, subs: map[*sub]struct{}{}}
}

// Publish stamps e with the next sequence number (and the time, if unset)
// and delivers it. A subscriber too slow to keep a buffer of 256 events is
// dropped (its channel closes) rather than slowing down the VMs' supervisors.
func (b *Broker) Publish(e api.Event) api.Event {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.seq++
	e.Seq = b.seq
	if e.Time.IsZero() {
		e.Time = time.Now().UTC()
	}
	b.ring = append(b.ring, e)
	if len(b.ring) > b.size {
		b.ring = b.ring[len(b.ring)-b.size:]
	}
	for s := range b.subs {
		select {
		case s.ch <- e:
		default:
			delete(b.subs, s)
			close(s.ch)
		}
	}
	return e
}

// Subscribe returns the remembered events with Seq > since, and a channel of
// every later event. cancel must be called when done.
func (b *Broker) Subscribe(since uint64) (backlog []api.Event, ch <-chan api.Event, cancel func()) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, e := range b.ring {
		if e.Seq > since {
			backlog = append(backlog, e)
		}
	}
	s := &sub{ch: make(chan api.Event, 256)}
	b.subs[s] = struct{}{}
	return backlog, s.ch, func() {
		b.mu.Lock()
		defer b.mu.Unlock()
		if _, ok := b.subs[s]; ok {
			delete(b.subs, s)
			close(s.ch)
		}
	}
}

// Last is the sequence number of the newest event.
func (b *Broker) Last() uint64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.seq
}
