package hostagent

import (
	"testing"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/hostproto"
)

func TestUsageHistoryKeepsOnePerPeriodOldestFirst(t *testing.T) {
	v := &vm{guest: &api.GuestInfo{MemUsedBytes: 7 << 20}}
	period := usageEvery * healthInterval
	t0 := time.Date(2026, 12, 2, 10, 0, 0, 0, time.UTC)
	for i := 0; i < usageKeep+10; i++ {
		at := t0.Add(time.Duration(i) * period)
		v.recordUsage(at, hostproto.VMUsage{CPUSeconds: float64(i)})
		// A late heartbeat's extra readings in between are not kept.
		v.recordUsage(at.Add(healthInterval), hostproto.VMUsage{CPUSeconds: -1})
	}
	got := v.history.samples()
	if len(got) != usageKeep {
		t.Fatalf("kept %d samples, want %d", len(got), usageKeep)
	}
	for i, s := range got {
		if want := float64(i + 10); s.CPUSeconds != want {
			t.Fatalf("sample %d has cpu %v, want %v (oldest first, the first 10 dropped)", i, s.CPUSeconds, want)
		}
		if s.MemUsedBytes != 7<<20 {
			t.Fatalf("sample %d lost the guest's memory use", i)
		}
	}
	if usageKeep*int(period) < int(14*time.Minute) {
		t.Fatalf("history covers only %v", time.Duration(usageKeep)*period)
	}
}
