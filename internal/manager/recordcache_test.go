package manager

import (
	"testing"
	"time"

	"github.com/vigil-project/vigil/internal/hostproto"
)

// TestRoomHeldUntilTheMirrorShowsTheMove: a VM moved to h2 keeps its room
// there after the move ends until the mirror of the records (which
// placement reads, and which may lag the record's write) shows it on h2;
// never counted twice; let go a minute after a move that failed.
func TestRoomHeldUntilTheMirrorShowsTheMove(t *testing.T) {
	const gib = int64(1 << 30)
	m := &Manager{
		hosts: &registry{hosts: map[string]*hostEntry{
			"h1": {h: missingHost("h1")}, "h2": {h: missingHost("h2")},
		}},
		cache:  &recordCache{byName: map[string]storedRecord{}, ready: true},
		moving: map[string]reservation{},
		placed: map[string]placed{},
	}
	put := func(host string, rev int64) {
		m.cache.byName["a"] = storedRecord{record{Spec: hostproto.VMSpec{Name: "a", MemoryBytes: gib, CPUs: 1}, Host: host, Desired: desiredRunning}, rev}
		m.cache.dirty = true
	}
	used := func() map[string]int64 {
		each, err := m.placementRecords(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]int64{}
		for _, c := range m.hosts.candidatesOf(each, m.moving) {
			out[c.host.Name] = c.usedMemory
		}
		return out
	}
	put("h1", 10)
	m.moving["a"] = reservation{host: "h2", mem: gib, cpus: 1}
	if u := used(); u["h2"] != gib || u["h1"] != gib {
		t.Fatalf("on its way: %v", u)
	}
	m.arrived("a") // the record says h2; the mirror does not yet
	if u := used(); u["h2"] != gib {
		t.Fatalf("arrived, mirror behind: h2 holds %d, want the vm's room", u["h2"])
	}
	put("h2", 11) // the mirror caught up
	if u := used(); u["h2"] != gib || u["h1"] != 0 || len(m.moving) != 0 {
		t.Fatalf("mirror caught up: %v, %d reservations left", u, len(m.moving))
	}
	// A move that failed: the room goes after a minute.
	m.moving["a"] = reservation{host: "h1", mem: gib, cpus: 1, arrived: time.Now().Add(-2 * time.Minute)}
	if u := used(); u["h1"] != 0 || len(m.moving) != 0 {
		t.Fatalf("a failed move's room was kept: %v", u)
	}
}
