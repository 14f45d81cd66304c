package agent

import (
	"sync"

	"github.com/vigil-project/vigil/internal/hostproto"
)

// outbox queues host events for the next heartbeat and wakes the sender.
type outbox struct {
	mu     sync.Mutex
	events []hostproto.Event
	wake   chan struct{}
}

func (o *outbox) add(e hostproto.Event) {
	o.mu.Lock()
	o.events = append(o.events, e)
	o.mu.Unlock()
	select {
	case o.wake <- struct{}{}:
	default:
	}
}

func (o *outbox) take() []hostproto.Event {
	o.mu.Lock()
	defer o.mu.Unlock()
	ev := o.events
	o.events = nil
	return ev
}

// putBack returns unsent events to the front of the queue.
func (o *outbox) putBack(ev []hostproto.Event) {
	o.mu.Lock()
	o.events = append(ev, o.events...)
	o.mu.Unlock()
}
