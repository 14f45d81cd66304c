package events

import (
	"testing"

	"github.com/vigil-project/vigil/api"
)

func TestBrokerBacklogAndLive(t *testing.T) {
	b := New(3)
	for _, typ := range []string{"a", "b", "c", "d"} {
		b.Publish(api.Event{Type: typ})
	}
	tests := []struct {
		since uint64
		want  []string
	}{
		{0, []string{"b", "c", "d"}}, // ring holds only the last 3
		{2, []string{"c", "d"}},
		{4, nil},
	}
	for _, tt := range tests {
		backlog, _, cancel := b.Subscribe(tt.since)
		cancel()
		var got []string
		for _, e := range backlog {
			got = append(got, e.Type)
		}
		if len(got) != len(tt.want) {
			t.Fatalf("since %d: got %v, want %v", tt.since, got, tt.want)
		}
		for i := range got {
			if got[i] != tt.want[i] {
				t.Fatalf("since %d: got %v, want %v", tt.since, got, tt.want)
			}
		}
	}
	_, ch, cancel := b.Subscribe(b.Last())
	defer cancel()
	b.Publish(api.Event{Type: "e"})
	if e := <-ch; e.Type != "e" || e.Seq != 5 {
		t.Fatalf("live event = %+v, want type e seq 5", e)
	}
}

func TestBrokerDropsSlowSubscriber(t *testing.T) {
	b := New(10)
	_, ch, cancel := b.Subscribe(0)
	defer cancel()
	for i := 0; i < 300; i++ {
		b.Publish(api.Event{Type: "x"})
	}
	n := 0
	for range ch {
		n++
	}
	if n != 256 {
		t.Fatalf("slow subscriber got %d events before its channel closed, want 256", n)
	}
}
