package store

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// hostStatus stands in for the manager's hoststatus/<name> record: a few
// KiB of JSON rewritten by every heartbeat.
type hostStatus struct {
	Name string `json:"name"`
	Seq  int    `json:"seq"`
	Blob string `json:"blob"`
}

func statusOf(host, seq, size int) hostStatus {
	return hostStatus{Name: fmt.Sprintf("host-%03d", host), Seq: seq, Blob: strings.Repeat("x", size)}
}

func startTestEtcd(t *testing.T, lim Limits) *Embedded {
	t.Helper()
	e, err := StartEmbeddedWithLimits(context.Background(), t.TempDir(), lim, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	return e
}

func nospaceAlarms(t *testing.T, cli *clientv3.Client) int {
	t.Helper()
	ar, err := cli.AlarmList(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, a := range ar.Alarms {
		if a.Alarm == pb.AlarmType_NOSPACE {
			n++
		}
	}
	return n
}

// The in-process client's Defragment panics in etcd 3.7.3 unless
// Embedded replaces it.
func TestEmbeddedClientDefragment(t *testing.T) {
	e := startTestEtcd(t, Limits{})
	if _, err := e.Client().Defragment(context.Background(), ""); err != nil {
		t.Fatalf("defragment through the embedded client: %v", err)
	}
	st, err := e.Client().Status(context.Background(), "")
	if err != nil {
		t.Fatal(err)
	}
	if st.DbSizeQuota != DefaultQuotaBytes {
		t.Fatalf("quota is %d bytes, want the explicit default %d", st.DbSizeQuota, DefaultQuotaBytes)
	}
}

func TestMaintainCompactsKeepingRecentHistory(t *testing.T) {
	e := startTestEtcd(t, Limits{KeepRevisions: -1})
	s := New(e.Client(), "/vigil/")
	ctx := context.Background()
	for i := range 300 {
		if err := s.Put(ctx, "hoststatus/host-001", statusOf(1, i, 100)); err != nil {
			t.Fatal(err)
		}
	}
	m := NewMaintainer(e.Client(), MaintainConfig{KeepRevisions: 100}, nil)
	if err := m.Pass(ctx); err != nil {
		t.Fatal(err)
	}
	st := m.Stats()
	if st.CompactedTo != st.Revision-100 || st.LastCompaction.IsZero() {
		t.Fatalf("after a pass at revision %d keeping 100: compacted to %d at %v, want %d", st.Revision, st.CompactedTo, st.LastCompaction, st.Revision-100)
	}
	if _, err := e.Client().Get(ctx, "/vigil/hoststatus/host-001", clientv3.WithRev(st.Revision-150)); !errors.Is(err, rpctypes.ErrCompacted) {
		t.Fatalf("revision %d (before the kept 100 of %d) still readable: err %v", st.Revision-150, st.Revision, err)
	}
	if _, err := e.Client().Get(ctx, "/vigil/hoststatus/host-001", clientv3.WithRev(st.Revision-50)); err != nil {
		t.Fatalf("revision %d (within the kept 100 of %d) lost: %v", st.Revision-50, st.Revision, err)
	}
	// A small, barely fragmented database is left alone.
	if st.Defrags != 0 || st.AlarmsCleared != 0 {
		t.Fatalf("routine pass on a %d-byte database (%d in use): %d defrags, %d alarms cleared; want none", st.DBSize, st.DBSizeInUse, st.Defrags, st.AlarmsCleared)
	}
}

// Fill a tiny quota with auto-compaction off until etcd raises NOSPACE, then
// show that one maintenance pass clears it and writes go through again.
func TestMaintainClearsNOSPACEAlarm(t *testing.T) {
	const quota = 2 << 20
	e := startTestEtcd(t, Limits{QuotaBytes: quota, KeepRevisions: -1})
	s := New(e.Client(), "/vigil/")
	ctx := context.Background()

	const hosts, size = 20, 2 << 10
	writes, full := 0, error(nil)
	for writes < 10*quota/size && full == nil {
		full = s.Put(ctx, fmt.Sprintf("hoststatus/host-%03d", writes%hosts), statusOf(writes%hosts, writes, size))
		writes++
	}
	if !errors.Is(full, rpctypes.ErrNoSpace) {
		t.Fatalf("after %d writes of %d bytes into a %d-byte quota: err %v, want NOSPACE", writes, size, quota, full)
	}
	if n := nospaceAlarms(t, e.Client()); n != 1 {
		t.Fatalf("after NOSPACE at write %d: %d NOSPACE alarms listed, want 1", writes, n)
	}
	if err := s.Put(ctx, "hoststatus/host-000", statusOf(0, 0, 10)); !errors.Is(err, rpctypes.ErrNoSpace) {
		t.Fatalf("write under a NOSPACE alarm: err %v, want NOSPACE", err)
	}

	m := NewMaintainer(e.Client(), MaintainConfig{}, nil)
	if err := m.Pass(ctx); err != nil {
		t.Fatalf("maintenance pass under NOSPACE: %v", err)
	}
	st := m.Stats()
	t.Logf("NOSPACE after %d writes (%d KiB of values); after one pass: db %d KiB (%d KiB in use) of %d KiB quota, compacted to %d of %d, %d defrags, %d alarms cleared",
		writes, writes*size>>10, st.DBSize>>10, st.DBSizeInUse>>10, quota>>10, st.CompactedTo, st.Revision, st.Defrags, st.AlarmsCleared)
	if st.AlarmsCleared != 1 || st.Defrags != 1 || st.DBSize >= quota/2 {
		t.Fatalf("after a pass under NOSPACE: %d alarms cleared, %d defrags, db %d bytes of a %d-byte quota; want 1, 1, under half the quota",
			st.AlarmsCleared, st.Defrags, st.DBSize, quota)
	}
	if n := nospaceAlarms(t, e.Client()); n != 0 {
		t.Fatalf("after the pass: %d NOSPACE alarms still listed", n)
	}
	for i := range 2 * hosts {
		if err := s.Put(ctx, fmt.Sprintf("hoststatus/host-%03d", i%hosts), statusOf(i%hosts, i, size)); err != nil {
			t.Fatalf("write %d after the alarm was cleared (db %d of %d bytes): %v", i, st.DBSize, quota, err)
		}
	}
}
