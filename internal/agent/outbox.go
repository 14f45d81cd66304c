package agent

import (
	"slices"
	"sync"

	"github.com/vigil-project/vigil/internal/hostproto"
)

// The outbox is bounded: a flood of events (a misbehaving guest, a manager
// away for long) must not grow the next heartbeat past what the manager
// accepts, or the host could never report again.
const (
	// maxQueued is the most events kept waiting for a heartbeat.
	maxQueued = 1000
	// maxTake is the most events one heartbeat carries; the rest follow
	// in the next ones.
	maxTake = 200
)

// outbox queues host events for the next heartbeat and wakes the sender.
type outbox struct {
	mu      sync.Mutex
	events  []hostproto.Event
	dropped uint64 // events thrown away to keep the bound, ever
	wake    chan struct{}
}

// importance ranks events for dropping: the lowest goes first. Exits and
// incidents drive recovery and fencing on the manager; health and
// guest-ready change its view of a VM; progress and run-state are
// informational and superseded by the next status anyway.
func importance(e hostproto.Event) int {
	if e.Incident != nil {
		return 3
	}
	switch e.Kind {
	case hostproto.EventProgress, hostproto.EventRunState:
		return 0
	case hostproto.EventHealth, hostproto.EventGuestReady:
		return 1
	case hostproto.EventExited, hostproto.EventIncident, hostproto.EventFenced, hostproto.EventDropped:
		return 3
	default: // started, adopted and kinds added later
		return 2
	}
}

func (o *outbox) add(e hostproto.Event) {
	o.mu.Lock()
	o.events = append(o.events, e)
	o.trimLocked()
	o.mu.Unlock()
	o.signal()
}

// take hands out the oldest events, at most maxTake. If more are waiting it
// wakes the sender again, so a backlog drains without waiting for the
// heartbeat ticker.
func (o *outbox) take() []hostproto.Event {
	o.mu.Lock()
	n := min(len(o.events), maxTake)
	ev := o.events[:n:n]
	o.events = slices.Clone(o.events[n:])
	more := len(o.events) > 0
	o.mu.Unlock()
	if more {
		o.signal()
	}
	return ev
}

// putBack returns unsent events to the front of the queue, still within
// the bound. It takes back a pending wake-up: the send just failed, and
// retrying at once (take wakes the sender for a backlog) would spin on a
// manager that is down; the sender's ticker paces the retries.
func (o *outbox) putBack(ev []hostproto.Event) {
	o.mu.Lock()
	o.events = append(slices.Clone(ev), o.events...)
	o.trimLocked()
	o.mu.Unlock()
	select {
	case <-o.wake:
	default:
	}
}

// Dropped is how many events were thrown away to keep the outbox bounded
// since it was made. The sender logs it when it grows.
func (o *outbox) Dropped() uint64 {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.dropped
}

// trimLocked drops events until the bound holds: each time the oldest of
// the least important ones, so an incident or an exit goes only when
// nothing less important is left.
func (o *outbox) trimLocked() {
	for len(o.events) > maxQueued {
		victim, rank := 0, importance(o.events[0])
		for i, e := range o.events {
			if r := importance(e); r < rank {
				victim, rank = i, r
				if rank == 0 {
					break
				}
			}
		}
		o.events = slices.Delete(o.events, victim, victim+1)
		o.dropped++
	}
}

func (o *outbox) signal() {
	select {
	case o.wake <- struct{}{}:
	default:
	}
}
