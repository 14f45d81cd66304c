package store

import (
	"context"
	"errors"
	"sync"
	"testing"
)

func TestClaims(t *testing.T) {
	e := startTestEtcd(t, Limits{})
	s := New(e.Client(), "/test/")
	ctx := context.Background()
	if _, err := s.CreateClaiming(ctx, "networks/blue", "blue", map[string]string{"vnis/1/": "blue"}); err != nil {
		t.Fatal(err)
	}
	// A second network wanting the same id fails whole: no record made.
	_, err := s.CreateClaiming(ctx, "networks/red", "red", map[string]string{"vnis/1/": "red", "vnis/2/": "red"})
	var ce *ClaimError
	if !errors.As(err, &ce) || ce.Key != "vnis/1/" || ce.Holder != "blue" || !errors.Is(err, ErrExists) {
		t.Fatalf("CreateClaiming of a held claim: %v", err)
	}
	if h, _ := s.ClaimHolder(ctx, "vnis/2/"); h != "" {
		t.Fatalf("a failed CreateClaiming left claim vnis/2/ held by %q", h)
	}
	var v string
	if _, err := s.Get(ctx, "networks/red", &v); !errors.Is(err, ErrNotFound) {
		t.Fatalf("a failed CreateClaiming left its record: %v", err)
	}
	if _, err := s.CreateClaiming(ctx, "x", 1, map[string]string{"no-slash": "x"}); err == nil {
		t.Fatal("a claim key without a trailing slash was accepted")
	}

	// Many managers racing for one address: exactly one wins.
	var wg sync.WaitGroup
	wins := make(chan string, 20)
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			name := string(rune('a' + i))
			if _, err := s.CreateClaiming(ctx, "vms/"+name, name, map[string]string{"netaddrs/blue/10.80.0.10/": name}); err == nil {
				wins <- name
			}
		}(i)
	}
	wg.Wait()
	close(wins)
	var winners []string
	for w := range wins {
		winners = append(winners, w)
	}
	if len(winners) != 1 {
		t.Fatalf("%d managers got the one address: %v", len(winners), winners)
	}
	if h, _ := s.ClaimHolder(ctx, "netaddrs/blue/10.80.0.10/"); h != winners[0] {
		t.Fatalf("the address is held by %q, the winner was %s", h, winners[0])
	}
	// A claim deleted by prefix is exactly that claim.
	if _, err := s.CreateClaiming(ctx, "vms/z", "z", map[string]string{"netaddrs/blue/10.80.0.100/": "z"}); err != nil {
		t.Fatal(err)
	}
	if err := s.DeletePrefix(ctx, "netaddrs/blue/10.80.0.10/"); err != nil {
		t.Fatal(err)
	}
	if h, _ := s.ClaimHolder(ctx, "netaddrs/blue/10.80.0.100/"); h != "z" {
		t.Fatal("deleting claim .10 deleted claim .100")
	}
	if err := s.Release(ctx, "netaddrs/blue/10.80.0.100/"); err != nil {
		t.Fatal(err)
	}
	if h, _ := s.ClaimHolder(ctx, "netaddrs/blue/10.80.0.100/"); h != "" {
		t.Fatal("Release left the claim")
	}
}
