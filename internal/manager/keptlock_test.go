package manager

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/vigil-project/vigil/api"
)

// writesDuring counts the puts and deletes of vm's record and of its lock
// key while f runs.
func writesDuring(t *testing.T, m *Manager, vm string, f func()) (record, lock int) {
	t.Helper()
	// The watch ends with ctx: an operation that wrote less than expected
	// fails the count instead of hanging the test.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cli := m.store.Client()
	start, err := cli.Get(ctx, "/test/")
	if err != nil {
		t.Fatal(err)
	}
	w := cli.Watch(ctx, "/test/", clientv3.WithPrefix(), clientv3.WithRev(start.Header.Revision+1))
	f()
	end, err := cli.Get(ctx, "/test/")
	if err != nil {
		t.Fatal(err)
	}
	for resp := range w {
		for _, ev := range resp.Events {
			switch string(ev.Kv.Key) {
			case "/test/" + vmKey(vm):
				record++
			case "/test/" + lockKey(vm):
				lock++
			}
		}
		if resp.Header.Revision >= end.Header.Revision {
			break
		}
	}
	return record, lock
}

func TestQuickOperationsWriteOnce(t *testing.T) {
	m, _ := newTestManager(t)
	ctx := context.Background()
	mustCreate(t, m, "v", true)
	pause := api.VMStateRequest{Action: api.ActionPause}
	resume := api.VMStateRequest{Action: api.ActionResume}
	// The first takes the lock with its intent, then writes its outcome
	// and keeps the lock.
	rec, lock := writesDuring(t, m, "v", func() {
		if _, err := m.ChangeState(ctx, "v", pause); err != nil {
			t.Fatal(err)
		}
	})
	if rec != 2 || lock != 1 {
		t.Fatalf("first pause: %d record and %d lock writes, want 2 and 1 (taken, kept)", rec, lock)
	}
	// The next ones, on the kept lock, write only their outcome.
	for i, req := range []api.VMStateRequest{resume, pause, resume} {
		rec, lock := writesDuring(t, m, "v", func() {
			if _, err := m.ChangeState(ctx, "v", req); err != nil {
				t.Fatal(err)
			}
		})
		if rec != 1 || lock != 0 {
			t.Fatalf("op %d (%s) on a kept lock: %d record and %d lock writes, want 1 and 0", i, req.Action, rec, lock)
		}
	}
	if got, _ := m.Get(ctx, "v"); got.State != api.StateRunning {
		t.Fatalf("state %s, want running", got.State)
	}
	// An operation that is not quick starts on the kept lock with its
	// intent, and releases the lock when it ends.
	rec, lock = writesDuring(t, m, "v", func() {
		if _, err := m.ChangeState(ctx, "v", api.VMStateRequest{Action: api.ActionStop}); err != nil {
			t.Fatal(err)
		}
	})
	if lock != 1 {
		t.Fatalf("stop on a kept lock: %d lock writes, want 1 (the release)", lock)
	}
	if held, _, _ := m.store.Held(ctx, lockKey("v")); held {
		t.Fatal("the lock is still held after a stop")
	}
}

func TestKeptLockIsReleasedWhenIdle(t *testing.T) {
	m, _ := newTestManager(t)
	ctx := context.Background()
	mustCreate(t, m, "v", true)
	if _, err := m.ChangeState(ctx, "v", api.VMStateRequest{Action: api.ActionPause}); err != nil {
		t.Fatal(err)
	}
	if held, _, _ := m.store.Held(ctx, lockKey("v")); !held {
		t.Fatal("the lock was not kept after a pause")
	}
	deadline := time.Now().Add(keepLocksFor + 2*time.Second)
	for {
		held, _, err := m.store.Held(ctx, lockKey("v"))
		if err != nil {
			t.Fatal(err)
		}
		if !held {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the kept lock was still held %s after the pause", keepLocksFor+2*time.Second)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// A second manager acting on a VM the first keeps the lock of waits for
// it instead of calling the VM busy.
func TestOtherManagerWaitsForKeptLock(t *testing.T) {
	ms, _ := newTestManagers(t, 2)
	ctx := context.Background()
	mustCreate(t, ms[0], "v", true)
	if _, err := ms[0].ChangeState(ctx, "v", api.VMStateRequest{Action: api.ActionPause}); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	vm, err := ms[1].ChangeState(ctx, "v", api.VMStateRequest{Action: api.ActionResume})
	if err != nil {
		t.Fatalf("resume through the other manager: %v", err)
	}
	if vm.State != api.StateRunning {
		t.Fatalf("state %s, want running", vm.State)
	}
	t.Logf("waited %s for the kept lock", time.Since(t0))
	// The controllers do not wait: a settle finds the VM busy at once.
	if _, err := ms[1].ChangeState(ctx, "v", api.VMStateRequest{Action: api.ActionPause}); err != nil {
		t.Fatal(err)
	}
	_, err = ms[0].begin(ctx, "v", opSettle, nil)
	if !errors.Is(err, ErrBusy) {
		t.Fatalf("settle on a lock another manager keeps: %v, want busy", err)
	}
}

// A lock kept under a lease that has since expired is not used: the
// operation takes the lock afresh.
func TestKeptLockFromOldLeaseIsDropped(t *testing.T) {
	m, _ := newTestManager(t)
	ctx := context.Background()
	mustCreate(t, m, "v", true)
	if _, err := m.ChangeState(ctx, "v", api.VMStateRequest{Action: api.ActionPause}); err != nil {
		t.Fatal(err)
	}
	lease, err := m.locks.lease(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.store.Client().Revoke(ctx, lease); err != nil {
		t.Fatal(err)
	}
	// The session notices the revocation asynchronously.
	deadline := time.Now().Add(5 * time.Second)
	for {
		l, err := m.locks.lease(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if l != lease {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the lock session did not notice its lease was revoked")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if _, err := m.ChangeState(ctx, "v", api.VMStateRequest{Action: api.ActionResume}); err != nil {
		t.Fatalf("resume after the lease changed: %v", err)
	}
	if got, _ := m.Get(ctx, "v"); got.State != api.StateRunning {
		t.Fatalf("state %s, want running", got.State)
	}
}

// An etcd that stalls longer than the lock session's TTL loses the lease
// before the session's keep-alive notices: the next create and the next
// operation must take a new session's lease and succeed, not fail with
// "requested lease not found" (seen at 1,000 simulated hosts).
func TestOperationsAfterTheLeaseVanished(t *testing.T) {
	m, _ := newTestManager(t)
	ctx := context.Background()
	mustCreate(t, m, "v", false)
	for _, step := range []struct {
		what string
		do   func() error
	}{
		{"create", func() error {
			_, err := m.Create(ctx, api.VMCreateRequest{Name: "w", MemoryBytes: 128 << 20, CPUs: 1, DiskBytes: 256 << 20})
			return err
		}},
		{"start", func() error {
			_, err := m.ChangeState(ctx, "v", api.VMStateRequest{Action: api.ActionStart})
			return err
		}},
	} {
		lease, err := m.locks.lease(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := m.store.Client().Revoke(ctx, lease); err != nil {
			t.Fatal(err)
		}
		if err := step.do(); err != nil {
			t.Fatalf("%s right after the lease vanished: %v", step.what, err)
		}
		if l, err := m.locks.lease(ctx); err != nil || l == lease {
			t.Fatalf("after the %s: lease %x (err %v), want a new one", step.what, l, err)
		}
	}
}

// Pauses and resumes racing on one VM through one manager: each is done or
// refused (busy, or already in that state), never half-done, and the record
// ends in line with the host.
func TestConcurrentQuickOperations(t *testing.T) {
	m, h := newTestManager(t)
	ctx := context.Background()
	mustCreate(t, m, "v", true)
	var wg sync.WaitGroup
	errs := make(chan error, 100)
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < 15; i++ {
				act := api.ActionPause
				if (i+g)%2 == 1 {
					act = api.ActionResume
				}
				_, err := m.ChangeState(ctx, "v", api.VMStateRequest{Action: act})
				if err != nil && !errors.Is(err, ErrConflict) && !errors.Is(err, ErrBusy) {
					errs <- err
				}
			}
		}(g)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("concurrent pause/resume: %v", err)
	}
	got, err := m.Get(ctx, "v")
	if err != nil {
		t.Fatal(err)
	}
	h.mu.Lock()
	paused := h.paused["v"]
	h.mu.Unlock()
	if (got.State == api.StatePaused) != paused {
		t.Fatalf("record says %s, host paused=%v", got.State, paused)
	}
}

// A quick operation that fails does not keep the lock: the VM is free for
// whoever comes next (a failover, another manager).
func TestFailedQuickOperationReleasesTheLock(t *testing.T) {
	m, h := newTestManager(t)
	ctx := context.Background()
	mustCreate(t, m, "v", true)
	if _, err := m.ChangeState(ctx, "v", api.VMStateRequest{Action: api.ActionPause}); err != nil {
		t.Fatal(err)
	}
	_, events, cancel := m.events.Subscribe(m.events.Last())
	defer cancel()
	h.fail("resume", errors.New("qemu is wedged"))
	if _, err := m.ChangeState(ctx, "v", api.VMStateRequest{Action: api.ActionResume}); err == nil {
		t.Fatal("a resume the host failed succeeded")
	}
	if held, _, _ := m.store.Held(ctx, lockKey("v")); held {
		t.Fatal("the lock is still held after a failed resume")
	}
	// The outcome written while the host acted is put back.
	var r record
	if _, err := m.store.Get(ctx, vmKey("v"), &r); err != nil {
		t.Fatal(err)
	}
	if r.State != api.StatePaused || r.Desired != desiredPaused || r.Op != nil {
		t.Fatalf("after a failed resume the record says %s (desired %s, intent %v), want paused as before", r.State, r.Desired, r.Op)
	}
	for {
		select {
		case e := <-events:
			if e.Type == "vm.state" {
				t.Fatalf("a failed resume published %+v", e)
			}
			continue
		default:
		}
		break
	}
}

// A quick operation on a kept lock writes its outcome while the host acts:
// the host, still acting, can already read it.
func TestQuickOutcomeWrittenWhileHostActs(t *testing.T) {
	m, h := newTestManager(t)
	ctx := context.Background()
	mustCreate(t, m, "v", true)
	if _, err := m.ChangeState(ctx, "v", api.VMStateRequest{Action: api.ActionPause}); err != nil {
		t.Fatal(err)
	}
	seen := make(chan api.VMState, 1)
	h.onStart("resume", func() {
		var r record
		for t0 := time.Now(); time.Since(t0) < 5*time.Second; time.Sleep(5 * time.Millisecond) {
			if _, err := m.store.Get(ctx, vmKey("v"), &r); err == nil && r.State == api.StateRunning {
				break
			}
		}
		seen <- r.State
	})
	vm, err := m.ChangeState(ctx, "v", api.VMStateRequest{Action: api.ActionResume})
	if err != nil {
		t.Fatal(err)
	}
	if got := <-seen; got != api.StateRunning {
		t.Fatalf("while the host resumed, the record said %s: the outcome waited for the host", got)
	}
	// The answer has the host's time; the record could not know it.
	if op := vm.LastOperation; op == nil || op.Action != "resume" || op.DurationMS <= 0 {
		t.Fatalf("answer's last operation %+v, want a resume that took the host's time", op)
	}
}

// A pause the host refuses, on a lock not kept, leaves the record as it
// was: the VM is still to run.
func TestFailedQuickOperationLeavesTheRecord(t *testing.T) {
	m, h := newTestManager(t)
	ctx := context.Background()
	mustCreate(t, m, "v", true)
	h.fail("pause", errors.New("qemu is wedged"))
	if _, err := m.ChangeState(ctx, "v", api.VMStateRequest{Action: api.ActionPause}); err == nil {
		t.Fatal("a pause the host failed succeeded")
	}
	var r record
	if _, err := m.store.Get(ctx, vmKey("v"), &r); err != nil {
		t.Fatal(err)
	}
	if r.State != api.StateRunning || r.Desired != desiredRunning || r.Op != nil {
		t.Fatalf("after a failed pause the record says %s (desired %s, intent %v), want running as before", r.State, r.Desired, r.Op)
	}
}

// A write under a kept lock that failed may have landed all the same (a
// cancelled request): the copy kept with the lock is then stale, and the
// next operation reads the record instead.
func TestKeptLockAfterAFailedWriteReadsTheRecord(t *testing.T) {
	m, _ := newTestManager(t)
	ctx := context.Background()
	mustCreate(t, m, "v", true)
	if _, err := m.ChangeState(ctx, "v", api.VMStateRequest{Action: api.ActionPause}); err != nil {
		t.Fatal(err)
	}
	// The record moves on behind the kept copy's back, as a landed write
	// that answered an error would have moved it.
	cli := m.store.Client()
	cur, err := cli.Get(ctx, "/test/"+vmKey("v"))
	if err != nil || len(cur.Kvs) == 0 {
		t.Fatal(err)
	}
	if _, err := cli.Put(ctx, "/test/"+vmKey("v"), string(cur.Kvs[0].Value)); err != nil {
		t.Fatal(err)
	}
	// A stop starts on the kept lock, finds its copy stale at the first
	// write, and goes on from the record as it is.
	if _, err := m.ChangeState(ctx, "v", api.VMStateRequest{Action: api.ActionStop, Force: true}); err != nil {
		t.Fatalf("stop after the record moved: %v", err)
	}
	if got, _ := m.Get(ctx, "v"); got.State != api.StateStopped {
		t.Fatalf("state %s, want stopped", got.State)
	}
}
