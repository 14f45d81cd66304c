package manager

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/events"
	"github.com/vigil-project/vigil/internal/store"
)

// TestSharedEvents runs two managers on one etcd: what one publishes
// reaches the other's subscribers, once, and does not come back to itself.
func TestSharedEvents(t *testing.T) {
	ms := sharingManagers(t, 100)
	_, ch0, cancel0 := ms[0].events.Subscribe(0)
	defer cancel0()
	_, ch1, cancel1 := ms[1].events.Subscribe(0)
	defer cancel1()

	ms[0].publish(api.Event{Type: "vm.created", VM: "a"})
	ms[1].publish(api.Event{Type: "vm.deleted", VM: "b"})

	got := func(ch <-chan api.Event) []string {
		var out []string
		timeout := time.After(2 * time.Second)
		for {
			select {
			case ev := <-ch:
				out = append(out, ev.Type+" "+ev.VM)
			case <-timeout:
				return out
			}
		}
	}
	for i, ch := range []<-chan api.Event{ch0, ch1} {
		evs := got(ch)
		if len(evs) != 2 || !slices.Contains(evs, "vm.created a") || !slices.Contains(evs, "vm.deleted b") {
			t.Fatalf("manager %d saw %v; want each event once", i, evs)
		}
	}
}

// TestSharedEventsBurst: a burst shared in batches reaches the other
// manager whole and in order, events of one instant included.
func TestSharedEventsBurst(t *testing.T) {
	ms := sharingManagers(t, 2000)
	_, ch, cancelSub := ms[1].events.Subscribe(0)
	defer cancelSub()
	const n = 900
	for i := range n {
		ms[0].publish(api.Event{Type: "vm.state", VM: fmt.Sprintf("vm%03d", i)})
	}
	timeout := time.After(10 * time.Second)
	for i := 0; i < n; i++ {
		select {
		case ev := <-ch:
			if want := fmt.Sprintf("vm%03d", i); ev.VM != want {
				t.Fatalf("event %d is of %s, want %s", i, ev.VM, want)
			}
		case <-timeout:
			t.Fatalf("%d of %d events arrived", i, n)
		}
	}
}

// sharingManagers starts two managers on one etcd that share their events,
// each keeping ring events, with both watches in place.
func sharingManagers(t *testing.T, ring int) []*Manager {
	t.Helper()
	e, err := store.StartEmbedded(context.Background(), t.TempDir(), nil)
	if err != nil {
		t.Fatalf("start etcd: %v", err)
	}
	t.Cleanup(e.Close)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	var ms []*Manager
	for range 2 {
		m := New(Config{Store: store.New(e.Client(), "/test/"), Events: events.New(ring), ShareEvents: true})
		go m.ShareEvents(ctx)
		ms = append(ms, m)
	}
	time.Sleep(300 * time.Millisecond) // both watches in place
	return ms
}
