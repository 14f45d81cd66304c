package hostproto

import (
	"encoding/json"
	"fmt"
	"reflect"
	"testing"
	"time"

	"github.com/vigil-project/vigil/api"
)

func reportOf(mut func(*Heartbeat)) Heartbeat {
	hb := Heartbeat{
		Info: api.Host{Name: "h0", Accel: "tcg", CPUs: 2, MemoryBytes: 8 << 30, QEMUVersion: "7.2", LastHeartbeat: time.Unix(100, 0), State: "up"},
		Statuses: []VMStatus{{
			Name: "a", Running: true, PID: 10, RunState: "running", StartedAt: time.Unix(50, 0),
			Guest:      &api.GuestInfo{BootID: "b1", Seq: 7, UptimeSeconds: 3, LastHeartbeat: time.Unix(99, 0), Agent: "vigil", Addresses: []string{"10.0.0.2"}},
			Protection: &ProtectionStatus{Secondary: "h1", Generation: 2, State: "protected", Seq: 4, CommittedAt: time.Unix(98, 0), PauseP99MS: 12},
			Usage:      &VMUsage{CPUSeconds: 1.5, NetRxBytes: 100},
		}},
	}
	if mut != nil {
		mut(&hb)
	}
	return hb
}

func TestSameReport(t *testing.T) {
	vm := func(f func(*VMStatus)) func(*Heartbeat) {
		return func(hb *Heartbeat) { f(&hb.Statuses[0]) }
	}
	tests := []struct {
		name string
		mut  func(*Heartbeat)
		same bool
	}{
		{"identical", nil, true},
		{"usage counters moved", vm(func(s *VMStatus) { s.Usage = &VMUsage{CPUSeconds: 9} }), true},
		{"guest heartbeat, sequence, uptime, load", vm(func(s *VMStatus) {
			s.Guest = &api.GuestInfo{BootID: "b1", Seq: 8, UptimeSeconds: 4, Load1: 0.5, MemUsedBytes: 1, LastHeartbeat: time.Unix(101, 0), Agent: "vigil", Addresses: []string{"10.0.0.2"}}
		}), true},
		{"checkpoint figures", vm(func(s *VMStatus) {
			s.Protection = &ProtectionStatus{Secondary: "h1", Generation: 2, State: "protected", Seq: 5, CommittedAt: time.Unix(99, 0), Bytes: 4096, SecondaryHeardAt: time.Unix(99, 0)}
		}), true},
		{"host's heartbeat time and state", func(hb *Heartbeat) { hb.Info.LastHeartbeat, hb.Info.State = time.Unix(200, 0), "" }, true},
		{"started time in another zone", vm(func(s *VMStatus) { s.StartedAt = time.Unix(50, 0).In(time.FixedZone("x", 3600)) }), true},
		{"vm stopped", vm(func(s *VMStatus) { s.Running = false }), false},
		{"new qemu", vm(func(s *VMStatus) { s.PID = 11 }), false},
		{"paused", vm(func(s *VMStatus) { s.RunState = "paused" }), false},
		{"restarted", vm(func(s *VMStatus) { s.StartedAt = time.Unix(60, 0) }), false},
		{"state file waiting", vm(func(s *VMStatus) { s.SavedState = true }), false},
		{"busy", vm(func(s *VMStatus) { s.Busy = "migrate" }), false},
		{"guest agent gone", vm(func(s *VMStatus) { s.Guest = nil }), false},
		{"guest rebooted", vm(func(s *VMStatus) { g := *s.Guest; g.BootID = "b2"; s.Guest = &g }), false},
		{"guest address changed", vm(func(s *VMStatus) { g := *s.Guest; g.Addresses = []string{"10.0.0.3"}; s.Guest = &g }), false},
		{"protection degraded", vm(func(s *VMStatus) { p := *s.Protection; p.State = "degraded"; s.Protection = &p }), false},
		{"new secondary", vm(func(s *VMStatus) {
			p := *s.Protection
			p.Secondary, p.Generation = "h2", 3
			s.Protection = &p
		}), false},
		{"protection ended", vm(func(s *VMStatus) { s.Protection = nil }), false},
		{"same vms, another order", func(hb *Heartbeat) {
			hb.Statuses = append([]VMStatus{{Name: "b"}}, hb.Statuses...)
		}, false},
		{"a vm more", func(hb *Heartbeat) { hb.Statuses = append(hb.Statuses, VMStatus{Name: "b"}) }, false},
		{"no vm", func(hb *Heartbeat) { hb.Statuses = nil }, false},
		{"host memory changed", func(hb *Heartbeat) { hb.Info.MemoryBytes = 16 << 30 }, false},
		{"host pool changed", func(hb *Heartbeat) { hb.Info.StoragePool = "p2" }, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := SameReport(reportOf(nil), reportOf(tt.mut)); got != tt.same {
				t.Fatalf("SameReport = %v, want %v", got, tt.same)
			}
		})
	}
	// A host may list its VMs in any order (a map): the order is no change.
	two := func(first, second string) Heartbeat {
		return reportOf(func(hb *Heartbeat) {
			hb.Statuses = []VMStatus{{Name: first, Running: true}, {Name: second}}
		})
	}
	if !SameReport(two("a", "b"), reportOf(func(hb *Heartbeat) {
		hb.Statuses = []VMStatus{{Name: "b"}, {Name: "a", Running: true}}
	})) {
		t.Fatal("the same vms in another order count as a change")
	}
	if SameReport(two("a", "b"), two("b", "a")) {
		t.Fatal("a vm that stopped and another that started count as no change")
	}
}

// TestWithTicks: a Same heartbeat's guest counters are laid over the held
// report (in its order or not) without changing it; a counter for a VM
// with no guest there means the host's report is another one.
func TestWithTicks(t *testing.T) {
	at := time.Unix(500, 0).UTC()
	held := []VMStatus{
		{Name: "a", Running: true, Guest: &api.GuestInfo{BootID: "b1", Seq: 1, UptimeSeconds: 1, LastHeartbeat: at, Agent: "vigil"}},
		{Name: "b", Running: true, Guest: &api.GuestInfo{BootID: "b2", Seq: 5, LastHeartbeat: at, Agent: "qemu-ga", Hostname: "web"}},
		{Name: "c"},
	}
	now := []VMStatus{
		{Name: "a", Running: true, Guest: &api.GuestInfo{BootID: "b1", Seq: 9, UptimeSeconds: 9, Load1: 0.5, LastHeartbeat: at.Add(8 * time.Second), Agent: "vigil"}},
		{Name: "b", Running: true, Guest: &api.GuestInfo{BootID: "b2", Seq: 13, MemUsedBytes: 7, LastHeartbeat: at.Add(8 * time.Second), Agent: "qemu-ga", Hostname: "web"}},
		{Name: "c"},
	}
	ticks := Ticks(now)
	if len(ticks) != 2 {
		t.Fatalf("ticks of two guests: %+v", ticks)
	}
	for _, order := range [][]GuestTick{ticks, {ticks[1], ticks[0]}} {
		got, err := WithTicks(held, order)
		if err != nil {
			t.Fatal(err)
		}
		for i := range now {
			if (got[i].Guest == nil) != (now[i].Guest == nil) || got[i].Guest != nil && !reflect.DeepEqual(*got[i].Guest, *now[i].Guest) {
				t.Fatalf("vm %s: %+v, want %+v", now[i].Name, got[i].Guest, now[i].Guest)
			}
		}
		if held[0].Guest.Seq != 1 || held[1].Guest.Seq != 5 {
			t.Fatal("WithTicks changed the held report")
		}
	}
	for _, bad := range []GuestTick{{Name: "c", Seq: 1}, {Name: "zz", Seq: 1}} {
		if _, err := WithTicks(held, []GuestTick{bad}); err == nil {
			t.Fatalf("a tick for vm %s (no guest in the report) was taken", bad.Name)
		}
	}
}

// BenchmarkHeartbeatDecode is what a manager spends decoding one host's
// heartbeat with 20 VMs: a full report, and one that says Same.
func BenchmarkHeartbeatDecode(b *testing.B) {
	now := time.Now().UTC()
	var full Heartbeat
	full.Info = api.Host{Name: "sim0001", State: "up", Accel: "sim", CPUs: 64, MemoryBytes: 512 << 30, VMs: 20, QEMUVersion: "simulated", StoragePool: "pool", PoolLocks: "shared"}
	for i := range 20 {
		full.Statuses = append(full.Statuses, VMStatus{Name: fmt.Sprintf("vm%05d", i), Running: true, PID: 1000 + i, RunState: "running", StartedAt: now,
			Guest: &api.GuestInfo{BootID: "000003e9-0000-4000-8000-0184a4b2c3d4", Seq: 1234, UptimeSeconds: 1234.5, Load1: 0.2, MemUsedBytes: 1 << 28, LastHeartbeat: now, Agent: "vigil"},
			Usage: &VMUsage{CPUSeconds: 12.3, DiskReadBytes: 1 << 20, DiskWriteBytes: 1 << 21, DiskReadOps: 100, DiskWriteOps: 200, NetRxBytes: 1 << 16, NetTxBytes: 1 << 15, NetRxPackets: 50, NetTxPackets: 40}})
	}
	full.Report = 7
	same := Heartbeat{Info: full.Info, Same: 7, Guests: Ticks(full.Statuses)}
	for _, c := range []struct {
		name string
		hb   Heartbeat
	}{{"full", full}, {"same", same}} {
		body, _ := json.Marshal(c.hb)
		b.Run(c.name, func(b *testing.B) {
			b.SetBytes(int64(len(body)))
			b.ReportAllocs()
			for b.Loop() {
				var hb Heartbeat
				if err := json.Unmarshal(body, &hb); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
