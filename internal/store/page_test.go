package store

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
)

// TestListAfterPages reads a prefix page by page: every key once, in order,
// nothing of a neighbouring prefix (vms/ against vmsx/), and "more" true
// until the last page.
func TestListAfterPages(t *testing.T) {
	e := startTestEtcd(t, Limits{})
	s := New(e.Client(), "/test/")
	ctx := context.Background()
	for i := 0; i < 25; i++ {
		if err := s.Put(ctx, fmt.Sprintf("vms/vm%02d", i), i); err != nil {
			t.Fatal(err)
		}
	}
	for _, k := range []string{"vmsx/a", "vm/z", "vms0"} {
		if err := s.Put(ctx, k, 0); err != nil {
			t.Fatal(err)
		}
	}
	for _, limit := range []int{1, 7, 25, 100} {
		var got []string
		after := ""
		for pages := 0; ; pages++ {
			if pages > 30 {
				t.Fatalf("limit %d: no end", limit)
			}
			kvs, more, err := s.ListAfter(ctx, "vms/", after, limit)
			if err != nil {
				t.Fatal(err)
			}
			if len(kvs) > limit {
				t.Fatalf("limit %d: a page of %d", limit, len(kvs))
			}
			for _, kv := range kvs {
				got = append(got, kv.Key)
			}
			if !more {
				break
			}
			after = kvs[len(kvs)-1].Key
		}
		if len(got) != 25 || got[0] != "vm00" || got[24] != "vm24" {
			t.Fatalf("limit %d: read %d keys %s", limit, len(got), strings.Join(got, ","))
		}
		for i := 1; i < len(got); i++ {
			if got[i] <= got[i-1] {
				t.Fatalf("limit %d: out of order at %d: %v", limit, i, got)
			}
		}
	}
}

// TestPutAllIf stores every pair at one revision while the condition holds,
// and none once it does not.
func TestPutAllIf(t *testing.T) {
	e := startTestEtcd(t, Limits{})
	s := New(e.Client(), "/test/")
	ctx := context.Background()
	if err := s.Put(ctx, "cond", 1); err != nil {
		t.Fatal(err)
	}
	var v int
	rev, err := s.Get(ctx, "cond", &v)
	if err != nil {
		t.Fatal(err)
	}
	got, err := s.PutAllIf(ctx, []Cond{{"cond", rev}, {"b", 0}}, Pair{"a", 1}, Pair{"b", 2})
	if err != nil {
		t.Fatal(err)
	}
	ra, _ := s.Get(ctx, "a", &v)
	rb, _ := s.Get(ctx, "b", &v)
	if ra != got || rb != got || v != 2 {
		t.Fatalf("a at %d, b at %d (=%d); want both at %d", ra, rb, v, got)
	}
	if _, err := s.PutAllIf(ctx, []Cond{{"cond", rev}, {"b", 0}}, Pair{"c", 1}); !errors.Is(err, ErrConflict) {
		t.Fatalf("b exists: %v, want ErrConflict", err)
	}
	if err := s.Put(ctx, "cond", 2); err != nil {
		t.Fatal(err)
	}
	if _, err := s.PutAllIf(ctx, []Cond{{"cond", rev}}, Pair{"a", 3}, Pair{"c", 4}); !errors.Is(err, ErrConflict) {
		t.Fatalf("stale condition: %v, want ErrConflict", err)
	}
	if _, err := s.Get(ctx, "c", &v); !errors.Is(err, ErrNotFound) {
		t.Fatalf("c written under a stale condition: %v", err)
	}
	if _, err := s.PutAllIf(ctx, []Cond{{"cond", rev}}); err == nil {
		t.Fatal("nothing to put: no error")
	}
}
