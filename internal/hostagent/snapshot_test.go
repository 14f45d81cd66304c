package hostagent

import (
	"testing"
	"time"

	"github.com/vigil-project/vigil/internal/qemu/qmp"
)

// TestPausedFor: the pause is read from QEMU's STOP and RESUME timestamps
// and returned as soon as the RESUME is in, without waiting for a lull; a
// guest that was not running, or whose events never come, reports none.
func TestPausedFor(t *testing.T) {
	t0 := time.Date(2026, 12, 2, 10, 0, 0, 0, time.UTC)
	ev := func(name string, ms int) qmp.Event {
		return qmp.Event{Name: name, Time: t0.Add(time.Duration(ms) * time.Millisecond)}
	}
	tests := []struct {
		name       string
		events     []qmp.Event
		close      bool
		wasRunning bool
		want       time.Duration
		maxWait    time.Duration
	}{
		{"stop then resume", []qmp.Event{ev("STOP", 0), ev("MIGRATION", 5), ev("RESUME", 12)}, false, true, 12 * time.Millisecond, 100 * time.Millisecond},
		{"resume without a stop is not a pause", []qmp.Event{ev("RESUME", 3), ev("STOP", 10), ev("RESUME", 19)}, false, true, 9 * time.Millisecond, 100 * time.Millisecond},
		{"not running", nil, false, false, 0, 10 * time.Millisecond},
		{"stream ended", []qmp.Event{ev("STOP", 0)}, true, true, 0, 100 * time.Millisecond},
		{"events lost", nil, false, true, 0, 3 * time.Second},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ch := make(chan qmp.Event)
			go func() {
				for _, e := range tt.events {
					ch <- e
				}
				if tt.close {
					close(ch)
				}
			}()
			start := time.Now()
			got := pausedFor(ch, tt.wasRunning)
			if got != tt.want {
				t.Errorf("paused %v, want %v", got, tt.want)
			}
			if d := time.Since(start); d > tt.maxWait {
				t.Errorf("took %v, want at most %v", d, tt.maxWait)
			}
		})
	}
}
