package hostagent

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestPoolLocksSharedOnOneMachine: two host agents on one pool directory of
// one kernel see each other's locks.
func TestPoolLocksSharedOnOneMachine(t *testing.T) {
	pool := t.TempDir()
	id, err := openPool(pool)
	if err != nil {
		t.Fatal(err)
	}
	a1, _ := newBareAgent(t)
	a2, _ := newBareAgent(t)
	a2.cfg.Name = "h2"
	for _, a := range []*Agent{a1, a2} {
		a.cfg.StoragePool, a.poolID = pool, id
		if got := a.PoolLocks(); got != PoolLocksUnknown {
			t.Fatalf("%s before it runs: %q, want %q", a.cfg.Name, got, PoolLocksUnknown)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{}, 2)
	defer func() {
		cancel()
		<-done
		<-done
	}()
	go func() { a1.Run(ctx); done <- struct{}{} }()
	waitUntil(t, func() bool { return a1.poolLocks.Load() != nil })
	if got := a1.PoolLocks(); got != PoolLocksUnknown {
		t.Fatalf("alone on the pool: %q, want %q", got, PoolLocksUnknown)
	}
	go func() { a2.Run(ctx); done <- struct{}{} }()
	// The second host probes as it starts; the first at its next round.
	waitUntil(t, func() bool { return a2.PoolLocks() == PoolLocksShared })
	a1.poolLocks.Load().check()
	if got := a1.PoolLocks(); got != PoolLocksShared {
		t.Fatalf("first host: %q, want %q", got, PoolLocksShared)
	}
	for _, name := range []string{"h1", "h2"} {
		if _, err := os.Stat(filepath.Join(pool, "hosts", name+".lock")); err != nil {
			t.Fatalf("lock file of %s: %v", name, err)
		}
	}
}

// TestPoolLocksVerdict drives the check with a fake clock and a fake probe,
// as on a file system that does or does not share locks between hosts.
func TestPoolLocksVerdict(t *testing.T) {
	t0 := time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)
	type round struct {
		at      time.Duration // now, since t0
		mtime   time.Duration // of the other host's file, since t0
		visible bool          // the probe sees its lock
		want    string
	}
	tests := []struct {
		name   string
		rounds []round
	}{
		{"alone", nil},
		{"a live host's lock is seen", []round{{0, -2 * time.Second, true, PoolLocksShared}}},
		{"a live host's lock is not seen", []round{
			// One look could be a host that just died (its lock went with
			// it, its file is still fresh): wait for it to touch the file.
			{0, -2 * time.Second, false, PoolLocksUnknown},
			{30 * time.Second, 28 * time.Second, false, PoolLocksNotShared},
		}},
		{"a host that died is no evidence", []round{
			{0, -2 * time.Second, false, PoolLocksUnknown},
			{30 * time.Second, -2 * time.Second, false, PoolLocksUnknown},
		}},
		{"an old file is no evidence", []round{{0, -time.Minute, false, PoolLocksUnknown}}},
		{"the verdict stays when the other host leaves", []round{
			{0, -2 * time.Second, true, PoolLocksShared},
			{30 * time.Second, -2 * time.Second, false, PoolLocksShared},
			{60 * time.Second, -2 * time.Second, false, PoolLocksShared},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, rec := newBareAgent(t)
			dir := filepath.Join(t.TempDir(), "hosts")
			now := t0
			var visible bool
			lc := newLockCheck(dir, "h1", a.log)
			lc.now = func() time.Time { return now }
			lc.probe = func(string) (bool, error) { return visible, nil }
			if err := lc.hold(); err != nil {
				t.Fatal(err)
			}
			defer lc.release()
			lc.check()
			if got := lc.verdict(); got != PoolLocksUnknown {
				t.Fatalf("no other host: %q", got)
			}
			other := filepath.Join(dir, "h2.lock")
			if err := os.WriteFile(other, nil, 0o644); err != nil {
				t.Fatal(err)
			}
			for i, r := range tt.rounds {
				now, visible = t0.Add(r.at), r.visible
				mt := t0.Add(r.mtime)
				if err := os.Chtimes(other, mt, mt); err != nil {
					t.Fatal(err)
				}
				lc.check()
				if got := lc.verdict(); got != r.want {
					t.Fatalf("round %d: %q, want %q", i, got, r.want)
				}
			}
			if tt.rounds != nil && tt.rounds[len(tt.rounds)-1].want == PoolLocksNotShared {
				if rec.logged("NFSv4") != 1 {
					t.Fatalf("not-shared was not explained once in the log:\n%s", rec.log.String())
				}
			}
		})
	}
}
