package hostproto

import (
	"fmt"
	"slices"
	"time"

	"github.com/vigil-project/vigil/api"
)

// A heartbeat carries every VM's status: about 10 KB with 20 VMs, decoded
// by a manager every second for every host. Most seconds nothing a decision
// reads has changed, only counters and times (usage, the guest's last
// heartbeat, checkpoint figures). A host then sends, instead of the
// statuses, the number of the last report a manager took from it (Same)
// and each guest's heartbeat counters (Guests, about a sixth of the
// bytes), and a full report when something changed (SameReport is the rule, for
// both sides), when it talks to another manager, or every FullReportEvery.
// A manager that does not hold that report answers 409 and the host sends
// it in full at once. A host sends Same only to a manager that said it
// takes it (ReportsHeader on its answers), so a manager of an older
// version never reads an empty report as "no VMs".

// FullReportEvery is how old the counters and times of a manager's view of
// a host may grow while nothing else changes.
const FullReportEvery = 10 * time.Second

// ReportsHeader, set to ReportsSame on a manager's answer to a heartbeat,
// says the manager takes heartbeats with Same.
const (
	ReportsHeader = "Vigil-Heartbeat-Reports"
	ReportsSame   = "same"
)

// SameReport says whether two reports of a host agree on everything a
// decision reads: the host's capacity and every VM's state, process, guest
// identity and protection state, in any order. Counters and times that
// move with every heartbeat are left out.
func SameReport(a, b Heartbeat) bool {
	if stableInfo(a.Info) != stableInfo(b.Info) || len(a.Statuses) != len(b.Statuses) {
		return false
	}
	for i, s := range b.Statuses {
		j := i
		if a.Statuses[i].Name != s.Name {
			j = slices.IndexFunc(a.Statuses, func(x VMStatus) bool { return x.Name == s.Name })
		}
		if j < 0 || !sameVMStatus(a.Statuses[j], s) {
			return false
		}
	}
	return true
}

func stableInfo(h api.Host) api.Host {
	h.State, h.LastHeartbeat, h.VMs = "", time.Time{}, 0
	h.ReservedMemoryBytes, h.ReservedCPUs, h.Drained = 0, 0, false
	return h
}

func sameVMStatus(a, b VMStatus) bool {
	if a.Name != b.Name || a.Running != b.Running || a.PID != b.PID || a.RunState != b.RunState ||
		!a.StartedAt.Equal(b.StartedAt) || a.SavedState != b.SavedState || a.Busy != b.Busy {
		return false
	}
	if (a.Guest == nil) != (b.Guest == nil) || (a.Protection == nil) != (b.Protection == nil) {
		return false
	}
	if g, h := a.Guest, b.Guest; g != nil && (g.BootID != h.BootID || g.Agent != h.Agent ||
		g.OS != h.OS || g.Hostname != h.Hostname || !slices.Equal(g.Addresses, h.Addresses)) {
		return false
	}
	if p, q := a.Protection, b.Protection; p != nil && (p.Secondary != q.Secondary ||
		p.Generation != q.Generation || p.State != q.State || p.Error != q.Error || p.Run != q.Run) {
		return false
	}
	return true
}

// Ticks are the guests' heartbeat counters of statuses, for a heartbeat
// that says Same.
func Ticks(statuses []VMStatus) []GuestTick {
	var out []GuestTick
	for _, s := range statuses {
		if g := s.Guest; g != nil {
			out = append(out, GuestTick{Name: s.Name, Seq: g.Seq, UptimeSeconds: g.UptimeSeconds,
				Load1: g.Load1, MemUsedBytes: g.MemUsedBytes, LastHeartbeat: g.LastHeartbeat})
		}
	}
	return out
}

// WithTicks is held (a report's statuses, left as they are) with the
// guests' counters of ticks. It fails if a tick names a VM that has no
// guest in held: the host's report is not the one held.
func WithTicks(held []VMStatus, ticks []GuestTick) ([]VMStatus, error) {
	out := slices.Clone(held)
	for i, t := range ticks {
		j := i
		if j >= len(out) || out[j].Name != t.Name {
			j = slices.IndexFunc(out, func(s VMStatus) bool { return s.Name == t.Name })
		}
		if j < 0 || out[j].Guest == nil {
			return nil, fmt.Errorf("guest counters for vm %s, which has no guest in the report held", t.Name)
		}
		g := *out[j].Guest
		g.Seq, g.UptimeSeconds, g.Load1, g.MemUsedBytes, g.LastHeartbeat = t.Seq, t.UptimeSeconds, t.Load1, t.MemUsedBytes, t.LastHeartbeat
		out[j].Guest = &g
	}
	return out, nil
}
