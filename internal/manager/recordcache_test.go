package manager

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
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
		m.cache.mu.Lock()
		m.cache.setLocked("a", &storedRecord{record{Spec: hostproto.VMSpec{Name: "a", MemoryBytes: gib, CPUs: 1}, Host: host, Desired: desiredRunning}, rev})
		m.cache.mu.Unlock()
	}
	used := func() map[string]int64 {
		res, err := m.placementReserved(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]int64{}
		for _, c := range m.hosts.candidatesFrom(res.usage, res.recordOf, m.moving) {
			out[c.host.Name] = c.usedMemory
		}
		return out
	}
	put("h1", 10)
	m.moving["a"] = reservation{host: "h2", mem: gib, cpus: 1}
	if u := used(); u["h2"] != gib || u["h1"] != gib {
		t.Fatalf("on its way: %v", u)
	}
	// The watch applies the move after placement read the sums: what it
	// read is one moment's, so h2 still holds the VM's room (once).
	res, err := m.placementReserved(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	put("h2", 11)
	for _, c := range m.hosts.candidatesFrom(res.usage, res.recordOf, m.moving) {
		if c.host.Name == "h2" && c.usedMemory != gib {
			t.Fatalf("the watch applied the move during placement: h2 holds %d, want the vm's room", c.usedMemory)
		}
	}
	put("h1", 12)  // back to before the move: the mirror lags behind it
	m.arrived("a") // the record says h2; the mirror does not yet
	if u := used(); u["h2"] != gib {
		t.Fatalf("arrived, mirror behind: h2 holds %d, want the vm's room", u["h2"])
	}
	put("h2", 13) // the mirror caught up
	if u := used(); u["h2"] != gib || u["h1"] != 0 || len(m.moving) != 0 {
		t.Fatalf("mirror caught up: %v, %d reservations left", u, len(m.moving))
	}
	// A move that failed: the room goes after a minute.
	m.moving["a"] = reservation{host: "h1", mem: gib, cpus: 1, arrived: time.Now().Add(-2 * time.Minute)}
	if u := used(); u["h1"] != 0 || len(m.moving) != 0 {
		t.Fatalf("a failed move's room was kept: %v", u)
	}
}

// TestCacheUsageFollowsEveryChange: what the mirror keeps of the hosts'
// reservations, change by change (new records, moves, state and
// protection changes, deletions, stale and unreadable updates), is always
// what a walk over all its records adds up to.
func TestCacheUsageFollowsEveryChange(t *testing.T) {
	c := &recordCache{byName: map[string]storedRecord{}}
	c.reload(map[string]storedRecord{
		"v0": {record{Spec: hostproto.VMSpec{Name: "v0", MemoryBytes: 1 << 30, CPUs: 2}, Host: "h0", Desired: desiredRunning}, 1},
	}, 1)
	hosts := []string{"h0", "h1", "h2"}
	desired := []string{desiredRunning, desiredPaused, desiredStopped}
	rng := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 2000; i++ {
		name := fmt.Sprintf("v%d", rng.IntN(12))
		rev := int64(i + 2)
		switch rng.IntN(10) {
		case 0:
			c.apply(t.Logf, "vms/"+name, nil, rev)
		case 1:
			c.apply(t.Logf, "vms/"+name, []byte("{not json"), rev)
		case 2:
			// An update older than the one cached: ignored.
			c.apply(t.Logf, "vms/"+name, []byte(`{"host":"h9"}`), 0)
		default:
			r := record{Spec: hostproto.VMSpec{Name: name, MemoryBytes: int64(1+rng.IntN(4)) << 28, CPUs: 1 + rng.IntN(4)},
				Host: hosts[rng.IntN(3)], Desired: desired[rng.IntN(3)]}
			if rng.IntN(3) == 0 {
				r.Protection = &protection{Secondary: hosts[rng.IntN(3)]}
			}
			b, err := json.Marshal(r)
			if err != nil {
				t.Fatal(err)
			}
			c.apply(t.Logf, "vms/"+name, b, rev)
		}
		want := map[string]hostUsage{}
		for _, s := range c.byName {
			reserve(want, s.rec, 1)
		}
		got, _ := c.usageCopy()
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("after change %d: kept %v, walk %v", i, got, want)
		}
	}
}

// TestCacheRevision: the mirror says it holds a revision only when every
// change up to it was applied: a scan's, the one below each change (a
// transaction's other changes may follow), etcd's progress reports; and
// wakes whoever waits when it moves on.
func TestCacheRevision(t *testing.T) {
	c := &recordCache{byName: map[string]storedRecord{}}
	if _, ok, moved := c.at(1); ok || moved != nil {
		t.Fatal("a mirror that never scanned answers, or offers to wait")
	}
	c.reload(map[string]storedRecord{}, 10)
	holds := func(rev int64, want bool) {
		t.Helper()
		if _, ok, _ := c.at(rev); ok != want {
			t.Fatalf("at(%d) = %v, want %v (mirror at %d)", rev, ok, want, c.rev)
		}
	}
	holds(10, true)
	_, _, moved := c.at(12)
	c.apply(t.Logf, "vms/a", []byte(`{"spec":{"name":"a"}}`), 12)
	select {
	case <-moved:
	default:
		t.Fatal("a change did not wake the waiter")
	}
	holds(11, true)
	holds(12, false)
	c.progress(12)
	holds(12, true)
	c.progress(5) // late news changes nothing
	holds(12, true)
	c.apply(t.Logf, "vms/a", []byte(`{not json`), 20)
	holds(19, true)
	c.mu.Lock()
	c.ready = false
	c.mu.Unlock()
	if _, ok, moved := c.at(1); ok || moved != nil {
		t.Fatal("a mirror whose watch broke answers, or offers to wait")
	}
}

// TestFollowTakesUpAWatchThatEnds: a watch that ends without an error is
// taken up again from the revision the mirror holds, with no new scan and
// the mirror current throughout, and every change arrives; one that fails
// means a new scan, with the mirror not current until it is done.
func TestFollowTakesUpAWatchThatEnds(t *testing.T) {
	c := &recordCache{byName: map[string]storedRecord{}}
	rec := func(name string) []byte { return []byte(`{"spec":{"name":"` + name + `"}}`) }
	type call struct {
		from  int64
		ready bool
	}
	var scans int
	var calls []call
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	scan := func(context.Context) (map[string]storedRecord, int64, error) {
		scans++
		if scans == 2 {
			return nil, 0, errors.New("store unavailable")
		}
		return map[string]storedRecord{}, 10 * int64(scans), nil
	}
	watch := func(_ context.Context, from int64) error {
		calls = append(calls, call{from, c.isReady()})
		switch len(calls) {
		case 1: // a transaction at 12 of two records, then a silent end
			c.apply(t.Logf, "vms/a", rec("a"), 12)
			c.apply(t.Logf, "vms/b", rec("b"), 12)
			return nil
		case 2: // taken up from 12: 12 again (to the same effect), then 15
			c.apply(t.Logf, "vms/b", rec("b"), 12)
			c.apply(t.Logf, "vms/c", rec("c"), 15)
			c.progress(17)
			return nil
		case 3: // taken up after etcd's progress report; then it fails
			if c.mu.Lock(); len(c.byName) != 3 {
				t.Errorf("the mirror holds %d records after the watch was taken up, want 3", len(c.byName))
			}
			c.mu.Unlock()
			return errors.New("mvcc: required revision has been compacted")
		default: // after the failed scan, the third one (at 30)
			cancel()
			return nil
		}
	}
	c.follow(ctx, scan, watch, slog.New(slog.DiscardHandler), time.Millisecond)
	want := []call{{11, true}, {12, true}, {18, true}, {31, true}}
	if fmt.Sprint(calls) != fmt.Sprint(want) || scans != 3 {
		t.Fatalf("watches %v after %d scans; want %v after 3 (the first, a failed one, then one that worked)", calls, scans, want)
	}
	if c.isReady() {
		t.Fatal("the mirror says it is current after follow returned")
	}
}
