package store

import (
	"context"
	"errors"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// keyTTL is the time left on the lease of key.
func keyTTL(t *testing.T, s *Store, key string) time.Duration {
	t.Helper()
	ctx := context.Background()
	resp, err := s.cli.Get(ctx, s.key(key))
	if err != nil || len(resp.Kvs) == 0 {
		t.Fatalf("get %s: %v (%d keys)", key, err, len(resp.Kvs))
	}
	if resp.Kvs[0].Lease == 0 {
		return 0
	}
	ttl, err := s.cli.TimeToLive(ctx, clientv3.LeaseID(resp.Kvs[0].Lease))
	if err != nil {
		t.Fatal(err)
	}
	return time.Duration(ttl.TTL) * time.Second
}

// Keys written with different TTLs never share a lease: a long-lived key
// written just after a short-lived one must not go with the short lease.
func TestPutTTLLeasePerTTL(t *testing.T) {
	e := startTestEtcd(t, Limits{})
	s := New(e.Client(), "/test/")
	ctx := context.Background()
	if err := s.PutTTL(ctx, "events/1", "e", time.Minute); err != nil {
		t.Fatal(err)
	}
	if err := s.PutTTL(ctx, "audit/1", "a", 24*time.Hour); err != nil {
		t.Fatal(err)
	}
	if err := s.PutTTL(ctx, "events/2", "e", time.Minute); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		key      string
		min, max time.Duration
	}{{"events/1", time.Minute, 2 * time.Minute}, {"events/2", time.Minute, 2 * time.Minute}, {"audit/1", 24 * time.Hour, 48 * time.Hour}} {
		if got := keyTTL(t, s, c.key); got < c.min || got > c.max {
			t.Errorf("%s lives %s, want %s to %s", c.key, got, c.min, c.max)
		}
	}
}

// The keys in also land with the record, or not at all.
func TestUpdateLockedAlso(t *testing.T) {
	e := startTestEtcd(t, Limits{})
	s := New(e.Client(), "/test/")
	ctx := context.Background()
	lease, err := e.Client().Grant(ctx, 30)
	if err != nil {
		t.Fatal(err)
	}
	l := Lock{Key: "locks/r", Lease: lease.ID, Value: "op 1"}
	rev, err := s.Acquire(ctx, "r", 0, "v0", l)
	if err != nil {
		t.Fatal(err)
	}
	// A stale revision: neither the record nor the audit entry is written.
	_, err = s.UpdateLocked(ctx, "r", rev-1, "stale", l, false, Also{Key: "audit/stale", Value: "x", TTL: time.Hour})
	if !errors.Is(err, ErrConflict) {
		t.Fatalf("update at a stale revision: %v, want a conflict", err)
	}
	var v string
	if _, err := s.Get(ctx, "audit/stale", &v); !errors.Is(err, ErrNotFound) {
		t.Fatalf("the audit entry of a refused update was written: %v", err)
	}
	if _, err := s.UpdateLocked(ctx, "r", rev, "v1", l, true, Also{Key: "audit/1", Value: "did v1", TTL: time.Hour}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get(ctx, "audit/1", &v); err != nil || v != "did v1" {
		t.Fatalf("audit/1 = %q, %v", v, err)
	}
	if got := keyTTL(t, s, "audit/1"); got < time.Hour || got > 2*time.Hour {
		t.Fatalf("audit/1 lives %s, want 1h to 2h", got)
	}
	if _, err := s.Get(ctx, "r", &v); err != nil || v != "v1" {
		t.Fatalf("r = %q, %v", v, err)
	}
}
