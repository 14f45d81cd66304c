package hostagent

import (
	"context"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/hostproto"
)

// usageKeep is how many usage samples a VM keeps: a quarter of an hour at
// the health watch's usage period (the dashboard's charts).
const usageKeep = int(15 * time.Minute / (usageEvery * healthInterval))

// usageRing is a VM's latest usage samples, oldest first once full. The
// zero value is empty; it is guarded by the VM's mu.
type usageRing struct {
	buf  []api.UsageSample
	next int // where the next sample goes once buf is full
	// last is when the latest sample was taken, with its monotonic
	// reading: the spacing holds across a step of the wall clock.
	last time.Time
}

func (r *usageRing) add(s api.UsageSample) {
	if len(r.buf) < usageKeep {
		r.buf = append(r.buf, s)
		return
	}
	r.buf[r.next] = s
	r.next = (r.next + 1) % usageKeep
}

// samples copies the ring out, oldest first.
func (r *usageRing) samples() []api.UsageSample {
	out := make([]api.UsageSample, 0, len(r.buf))
	out = append(out, r.buf[r.next:]...)
	return append(out, r.buf[:r.next]...)
}

// recordUsage keeps one reading of the VM's counters (taken at at) for its
// history. Called with v.mu held.
func (v *vm) recordUsage(at time.Time, u hostproto.VMUsage) {
	s := api.UsageSample{Time: at.UTC(), CPUSeconds: u.CPUSeconds, DiskReadBytes: u.DiskReadBytes,
		DiskWriteBytes: u.DiskWriteBytes, NetRxBytes: u.NetRxBytes, NetTxBytes: u.NetTxBytes}
	if v.guest != nil {
		s.MemUsedBytes = v.guest.MemUsedBytes
	}
	// Readings taken while a heartbeat is late come faster than the
	// usage period; the history keeps one per period.
	if !v.history.last.IsZero() && at.Sub(v.history.last) < usageEvery*healthInterval-healthInterval/2 {
		return
	}
	v.history.last = at
	v.history.add(s)
}

// Usage returns the VM's usage history (empty when it has not run here
// for a usage period yet).
func (a *Agent) Usage(_ context.Context, r hostproto.VMRef) (api.UsageHistory, error) {
	v, err := a.get(r.VM)
	if err != nil {
		return api.UsageHistory{}, err
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	return api.UsageHistory{VM: r.VM, Host: a.cfg.Name, Samples: v.history.samples()}, nil
}
