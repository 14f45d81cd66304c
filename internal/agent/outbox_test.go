package agent

import (
	"fmt"
	"testing"

	"github.com/vigil-project/vigil/internal/hostproto"
)

func ev(kind hostproto.EventKind, msg string) hostproto.Event {
	return hostproto.Event{VM: "web1", Kind: kind, Message: msg}
}

func incident(msg string) hostproto.Event {
	e := ev(hostproto.EventIncident, msg)
	e.Incident = &hostproto.Incident{Kind: hostproto.IncidentHang}
	return e
}

// kinds counts the events of each kind in evs.
func kinds(evs []hostproto.Event) map[hostproto.EventKind]int {
	n := map[hostproto.EventKind]int{}
	for _, e := range evs {
		n[e.Kind]++
	}
	return n
}

// takeAll empties the outbox, heartbeat by heartbeat, checking that none
// carries more than maxTake events.
func takeAll(t *testing.T, o *outbox) []hostproto.Event {
	t.Helper()
	var all []hostproto.Event
	for i := 0; ; i++ {
		got := o.take()
		if len(got) > maxTake {
			t.Fatalf("take handed out %d events, want at most %d", len(got), maxTake)
		}
		if len(got) == 0 {
			return all
		}
		all = append(all, got...)
		if i > maxQueued {
			t.Fatal("the outbox never empties")
		}
	}
}

// TestOutboxBounded checks that a flood cannot grow the outbox (and so a
// heartbeat body) without limit, and that what goes first is what matters
// least.
func TestOutboxBounded(t *testing.T) {
	tests := []struct {
		name        string
		add         []hostproto.Event
		wantDropped uint64
		want        map[hostproto.EventKind]int
	}{
		{
			name: "a quiet host loses nothing",
			add: []hostproto.Event{ev(hostproto.EventStarted, ""), ev(hostproto.EventGuestReady, ""),
				ev(hostproto.EventExited, "")},
			want: map[hostproto.EventKind]int{hostproto.EventStarted: 1, hostproto.EventGuestReady: 1, hostproto.EventExited: 1},
		},
		{
			name:        "a flood of one kind keeps the bound",
			add:         repeat(1500, func(i int) hostproto.Event { return ev(hostproto.EventGuestReady, fmt.Sprint(i)) }),
			wantDropped: 500,
			want:        map[hostproto.EventKind]int{hostproto.EventGuestReady: maxQueued},
		},
		{
			name: "progress goes before guest-ready, which goes before exits and incidents",
			add: concat(
				repeat(10, func(int) hostproto.Event { return ev(hostproto.EventExited, "") }),
				repeat(10, func(int) hostproto.Event { return incident("") }),
				repeat(500, func(int) hostproto.Event { return ev(hostproto.EventProgress, "") }),
				repeat(500, func(int) hostproto.Event { return ev(hostproto.EventRunState, "") }),
				repeat(600, func(int) hostproto.Event { return ev(hostproto.EventGuestReady, "") }),
			),
			wantDropped: 620,
			want: map[hostproto.EventKind]int{hostproto.EventExited: 10, hostproto.EventIncident: 10,
				hostproto.EventRunState: 380, hostproto.EventGuestReady: 600},
		},
		{
			name: "incidents and exits stay while anything less important can go",
			add: concat(
				repeat(maxQueued, func(int) hostproto.Event { return ev(hostproto.EventHealth, "") }),
				repeat(maxQueued-1, func(int) hostproto.Event { return incident("") }),
				[]hostproto.Event{ev(hostproto.EventExited, "last")},
				repeat(50, func(int) hostproto.Event { return ev(hostproto.EventProgress, "") }),
			),
			wantDropped: maxQueued + 50,
			want:        map[hostproto.EventKind]int{hostproto.EventIncident: maxQueued - 1, hostproto.EventExited: 1},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := &outbox{wake: make(chan struct{}, 1)}
			for _, e := range tt.add {
				o.add(e)
			}
			if got := o.Dropped(); got != tt.wantDropped {
				t.Fatalf("Dropped() = %d, want %d", got, tt.wantDropped)
			}
			all := takeAll(t, o)
			if len(all) > maxQueued {
				t.Fatalf("%d events queued, want at most %d", len(all), maxQueued)
			}
			if got := kinds(all); fmt.Sprint(got) != fmt.Sprint(tt.want) {
				t.Fatalf("kept %v, want %v", got, tt.want)
			}
		})
	}
}

// TestOutboxTakeKeepsOrder checks that events go out in the order they
// happened, at most maxTake per heartbeat, and that a failed send puts them
// back in front of newer ones.
func TestOutboxTakeKeepsOrder(t *testing.T) {
	o := &outbox{wake: make(chan struct{}, 1)}
	for i := range 450 {
		o.add(ev(hostproto.EventStarted, fmt.Sprint(i)))
	}
	<-o.wake
	first := o.take()
	if len(first) != maxTake || first[0].Message != "0" || first[maxTake-1].Message != fmt.Sprint(maxTake-1) {
		t.Fatalf("first take: %d events from %q", len(first), first[0].Message)
	}
	select {
	case <-o.wake:
	default:
		t.Fatal("events left behind but the sender was not woken for them")
	}
	// The send failed: the same events go out first next time.
	o.add(ev(hostproto.EventStarted, "new"))
	o.putBack(first)
	select {
	case <-o.wake:
		t.Fatal("a failed send woke the sender at once: it would spin on a manager that is down")
	default:
	}
	all := takeAll(t, o)
	if len(all) != 451 {
		t.Fatalf("%d events after put back, want 451", len(all))
	}
	for i, e := range all[:450] {
		if e.Message != fmt.Sprint(i) {
			t.Fatalf("event %d is %q: order lost", i, e.Message)
		}
	}
	if all[450].Message != "new" {
		t.Fatalf("last event %q, want the one added during the send", all[450].Message)
	}

	// Put back never breaks the bound either.
	for range maxQueued {
		o.add(ev(hostproto.EventProgress, ""))
	}
	o.putBack(repeat(maxTake, func(int) hostproto.Event { return ev(hostproto.EventExited, "") }))
	if all := takeAll(t, o); len(all) != maxQueued || kinds(all)[hostproto.EventExited] != maxTake {
		t.Fatalf("after put back into a full outbox: %v", kinds(all))
	}
	if got := o.Dropped(); got != maxTake {
		t.Fatalf("Dropped() = %d, want %d", got, maxTake)
	}
}

func repeat(n int, f func(int) hostproto.Event) []hostproto.Event {
	out := make([]hostproto.Event, n)
	for i := range out {
		out[i] = f(i)
	}
	return out
}

func concat(s ...[]hostproto.Event) []hostproto.Event {
	var out []hostproto.Event
	for _, x := range s {
		out = append(out, x...)
	}
	return out
}
