package simhost

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/vigil-project/vigil/internal/hostproto"
)

// TestLifecycle: a simulated VM is created, starts with a new boot, reports
// heartbeats that advance, stops, is fenced, and is gone once deleted; what
// needs a hypervisor says so.
func TestLifecycle(t *testing.T) {
	var events []hostproto.Event
	h := New("h1", "pool", func(e hostproto.Event) { events = append(events, e) })
	ctx := context.Background()
	if _, err := h.Create(ctx, hostproto.CreateRequest{Spec: hostproto.VMSpec{Name: "a"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := h.Create(ctx, hostproto.CreateRequest{Spec: hostproto.VMSpec{Name: "a"}}); err == nil {
		t.Fatal("created a twice")
	}
	if st, _ := h.Status(ctx, hostproto.VMRef{VM: "a"}); st.Running {
		t.Fatal("running before start")
	}
	if _, err := h.Start(ctx, hostproto.VMRef{VM: "a"}); err != nil {
		t.Fatal(err)
	}
	s1 := h.Statuses()[0]
	s2 := h.Statuses()[0]
	if !s1.Running || s1.Guest == nil || s2.Guest.Seq <= s1.Guest.Seq || s2.Guest.BootID != s1.Guest.BootID {
		t.Fatalf("statuses of a running vm: %+v then %+v", s1, s2)
	}
	if _, err := h.Restart(ctx, hostproto.VMRef{VM: "a"}); err != nil {
		t.Fatal(err)
	}
	if s3 := h.Statuses()[0]; s3.Guest.BootID == s1.Guest.BootID {
		t.Fatal("a restart kept the boot")
	}
	if n := h.Fence("test"); n != 1 || h.Statuses()[0].Running {
		t.Fatalf("fence stopped %d", n)
	}
	h.Fence("again") // nothing runs: not counted
	if c := h.Counts(); c != (Counts{Starts: 2, Fences: 1, FencedVMs: 1}) {
		t.Fatalf("counts after a start, a restart and a fence: %+v", c)
	}
	if _, err := h.Start(ctx, hostproto.VMRef{VM: "nope"}); !errors.Is(err, hostproto.ErrUnknownVM) {
		t.Fatalf("start of an unknown vm: %v", err)
	}
	if _, err := h.SnapshotCreate(ctx, hostproto.SnapshotRequest{VM: "a"}); !errors.Is(err, ErrNotSimulated) {
		t.Fatalf("snapshot: %v", err)
	}
	h.Delete(ctx, hostproto.VMRef{VM: "a"})
	if len(h.Statuses()) != 0 || h.HostInfo().VMs != 0 {
		t.Fatal("a deleted vm is still reported")
	}
	if len(events) == 0 || events[0].Kind != hostproto.EventStarted || events[0].Host != "h1" {
		t.Fatalf("events: %+v", events)
	}
}

// TestFreeze: a frozen host answers nothing (its statuses wait) until it is
// thawed, then goes on with its VMs as they were.
func TestFreeze(t *testing.T) {
	h := New("h1", "pool", func(hostproto.Event) {})
	ctx := context.Background()
	h.Create(ctx, hostproto.CreateRequest{Spec: hostproto.VMSpec{Name: "a"}})
	h.Start(ctx, hostproto.VMRef{VM: "a"})
	h.Freeze()
	got := make(chan []hostproto.VMStatus)
	go func() { got <- h.Statuses() }()
	select {
	case <-got:
		t.Fatal("a frozen host reported its statuses")
	case <-time.After(50 * time.Millisecond):
	}
	h.Thaw()
	if st := <-got; len(st) != 1 || !st[0].Running {
		t.Fatalf("after the thaw: %+v", st)
	}
	if r := h.Running(); len(r) != 1 || r[0] != "a" {
		t.Fatalf("running: %v", r)
	}
	if r := h.RunningAmong([]string{"x", "a", "y"}); len(r) != 1 || r[0] != "a" {
		t.Fatalf("running among x, a, y: %v", r)
	}
	if r := h.RunningAmong([]string{"x"}); len(r) != 0 {
		t.Fatalf("running among x: %v", r)
	}
}
