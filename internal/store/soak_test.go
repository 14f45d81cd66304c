package store

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
)

// TestSoakHeartbeatsStayUnderQuota replays the defect at an accelerated
// rate: 100 hosts rewrite a 2 KiB status key 20 times a second (20× a real
// heartbeat) against a 32 MiB quota, until the history written is several
// times the quota. Maintain runs alongside, scaled so that a pass sees about
// the share of the quota written between two passes that production does
// (~500 revisions ≈ 5% of 32 MiB here; 6000 ≈ 1% of 2 GiB for 100 hosts
// and a pass a minute). etcd's own revision compactor runs only every
// 5 minutes, so here Maintain does all the compacting — as it must for an
// external cluster without auto-compaction.
//
// Maintain starts only once unmaintained history fills half the quota, as
// when a manager with this fix meets a database that already grew: its
// first passes must compact and defragment that backlog.
func TestSoakHeartbeatsStayUnderQuota(t *testing.T) {
	if testing.Short() {
		t.Skip("soak test: skipped with -short")
	}
	const (
		quota    = 32 << 20
		hosts    = 100
		beat     = 50 * time.Millisecond
		size     = 2 << 10
		keep     = 1000 // 2 MiB of statuses: the production ratio, 30 MiB of 2 GiB, scaled to a small quota
		minRun   = 5 * time.Second
		maxRun   = 40 * time.Second
		overfill = 3 // write at least this many quotas of history
	)
	e := startTestEtcd(t, Limits{QuotaBytes: quota, KeepRevisions: keep})
	s := New(e.Client(), "/vigil/")

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	m := NewMaintainer(e.Client(), MaintainConfig{Every: 250 * time.Millisecond, KeepRevisions: keep, DefragEvery: 5 * time.Second, DefragMinFree: 4 << 20}, nil)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	var backlog, backlogWrites int64 // db size and writes when Maintain started

	var (
		writes, written, nospace atomic.Int64
		errMu                    sync.Mutex
		firstErr                 error
		maxSize, maxInUse        int64
	)
	wctx, stop := context.WithCancel(ctx)
	var writers sync.WaitGroup
	start := time.Now()
	for h := range hosts {
		key := fmt.Sprintf("hoststatus/host-%03d", h)
		writers.Go(func() {
			tick := time.NewTicker(beat)
			defer tick.Stop()
			for seq := 0; wctx.Err() == nil; seq++ {
				select {
				case <-wctx.Done():
					return
				case <-tick.C:
				}
				pctx, cancel := context.WithTimeout(wctx, 10*time.Second)
				err := s.Put(pctx, key, statusOf(h, seq, size))
				cancel()
				switch {
				case err == nil:
					writes.Add(1)
					written.Add(int64(len(key) + size))
				case wctx.Err() != nil:
				default:
					if errors.Is(err, rpctypes.ErrNoSpace) {
						nospace.Add(1)
					}
					errMu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					errMu.Unlock()
				}
			}
		})
	}

	// Sample the database size far more often than Maintain looks at it.
	for {
		if st, err := e.Client().Status(ctx, ""); err == nil {
			maxSize, maxInUse = max(maxSize, st.DbSize), max(maxInUse, st.DbSizeInUse)
			if backlog == 0 && st.DbSize >= quota/2 {
				backlog, backlogWrites = st.DbSize, writes.Load()
				wg.Go(func() { m.Run(ctx) })
			}
		}
		el := time.Since(start)
		if el >= maxRun || (el >= minRun && written.Load() >= overfill*quota) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	stop()
	writers.Wait()
	el := time.Since(start)
	// A pass that was under way when the writers stopped saw an older
	// revision; the one after it must leave exactly keep revisions.
	for p, deadline := m.Stats().Passes, time.Now().Add(10*time.Second); m.Stats().Passes < p+2 && time.Now().Before(deadline); {
		time.Sleep(50 * time.Millisecond)
	}
	st := m.Stats()

	t.Logf("%d hosts wrote %d statuses of %d B in %v (%.0f/s): history would hold ≥ %.1f MiB of keys and values, %.1f× the %d MiB quota",
		hosts, writes.Load(), size, el.Round(time.Millisecond), float64(writes.Load())/el.Seconds(),
		float64(written.Load())/(1<<20), float64(written.Load())/quota, quota>>20)
	if backlogWrites > 0 {
		perRev := float64(backlog) / float64(backlogWrites)
		t.Logf("unmaintained, the db grew %.0f B a write: the whole history would take ≈ %.0f MiB, %.1f× the quota",
			perRev, perRev*float64(writes.Load())/(1<<20), perRev*float64(writes.Load())/quota)
	}
	t.Logf("db size: %.1f MiB when Maintain started, max %.1f MiB (max in use %.1f MiB, %.0f%% of quota), at the end %.1f MiB (%.1f MiB in use)",
		float64(backlog)/(1<<20), float64(maxSize)/(1<<20), float64(maxInUse)/(1<<20), 100*float64(maxSize)/quota,
		float64(st.DBSize)/(1<<20), float64(st.DBSizeInUse)/(1<<20))
	t.Logf("maintenance: %d passes, compacted to %d of %d, %d defrags, %d alarms cleared, last error %q",
		st.Passes, st.CompactedTo, st.Revision, st.Defrags, st.AlarmsCleared, st.LastError)

	if n := nospace.Load(); n > 0 || firstErr != nil {
		t.Fatalf("%d writes failed with NOSPACE (of %d that succeeded; db at most %d of %d bytes); first error: %v",
			n, writes.Load(), maxSize, quota, firstErr)
	}
	if backlog == 0 || st.Passes == 0 {
		t.Fatalf("the database never reached half the %d-byte quota (max %d bytes, %d written) before the soak ended: Maintain never ran", quota, maxSize, written.Load())
	}
	if written.Load() < quota {
		t.Fatalf("only %d bytes of history written in %v, under the %d-byte quota: the soak proves nothing on a machine this slow", written.Load(), el, quota)
	}
	if maxSize >= quota || st.AlarmsCleared != 0 {
		t.Fatalf("db reached %d bytes of a %d-byte quota (%d NOSPACE alarms cleared) while %d bytes of history were written", maxSize, quota, st.AlarmsCleared, written.Load())
	}
	if st.Defrags == 0 || st.DBSize > backlog*3/4 {
		t.Fatalf("the %d-byte backlog was not given back: %d defrags, db %d bytes at the end (%d in use)", backlog, st.Defrags, st.DBSize, st.DBSizeInUse)
	}
	if st.Revision-st.CompactedTo > keep {
		t.Fatalf("history compacted to revision %d of %d: more than %d revisions kept", st.CompactedTo, st.Revision, keep)
	}
}
