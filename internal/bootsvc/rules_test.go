package bootsvc

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/vigil-project/vigil/api"
)

func TestRuleValidation(t *testing.T) {
	cases := []struct {
		name string
		rule api.BootRule
		bad  string // part of the error; empty: valid
	}{
		{"exact mac", api.BootRule{Name: "r", MAC: "52:54:00:BE:EE:01", HostName: "h3"}, ""},
		{"mac prefix", api.BootRule{Name: "r", MAC: "52:54:00:*"}, ""},
		{"half a byte", api.BootRule{Name: "r", MAC: "52:54:0*"}, "whole leading bytes"},
		{"bad mac", api.BootRule{Name: "r", MAC: "52:54"}, "not an Ethernet address"},
		{"uuid", api.BootRule{Name: "r", UUID: "6F1C2D3E-0000-4000-8000-0000000000B1", HostName: "h3"}, ""},
		{"bad uuid", api.BootRule{Name: "r", UUID: "6f1c"}, "not a UUID"},
		{"vendor", api.BootRule{Name: "r", Vendor: "Dell Inc."}, ""},
		{"vendor with a control character", api.BootRule{Name: "r", Vendor: "Dell\x00"}, "printable"},
		{"no matcher", api.BootRule{Name: "r"}, "matches nothing"},
		{"a name for many", api.BootRule{Name: "r", Vendor: "QEMU", HostName: "h3"}, "names one machine"},
		{"a name for a prefix", api.BootRule{Name: "r", MAC: "52:54:00:*", HostName: "h3"}, "names one machine"},
		{"generated names too long", api.BootRule{Name: "r", Vendor: "QEMU", Profile: strings.Repeat("p", 60)}, "--host-prefix"},
		{"bad host name", api.BootRule{Name: "r", MAC: "52:54:00:be:ee:01", HostName: "H_3"}, "DNS label"},
		{"bad prefix", api.BootRule{Name: "r", Vendor: "QEMU", HostPrefix: "Rack A"}, "host prefix"},
		{"bad rule name", api.BootRule{Name: "R 1", Vendor: "QEMU"}, "rule name"},
		{"negative rank", api.BootRule{Name: "r", Vendor: "QEMU", Rank: -1}, "negative"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := c.rule
			err := normalRule(&r)
			switch {
			case c.bad == "" && err != nil:
				t.Fatalf("refused: %v", err)
			case c.bad != "" && (err == nil || !strings.Contains(err.Error(), c.bad) || !errors.Is(err, ErrInvalid)):
				t.Fatalf("got %v, want an invalid-input error with %q", err, c.bad)
			}
		})
	}
	r := api.BootRule{Name: "r", MAC: "52:54:00:BE:EE:01", UUID: "6F1C2D3E-0000-4000-8000-0000000000B1"}
	normalRule(&r)
	if r.MAC != "52:54:00:be:ee:01" || r.UUID != "6f1c2d3e-0000-4000-8000-0000000000b1" {
		t.Fatalf("not normalized: %+v", r)
	}
}

func TestRulesAdmitByRank(t *testing.T) {
	reg := testRegistry(t)
	ctx := context.Background()
	img := fakeImage(t, reg, "a")
	for _, p := range []string{"default", "rack-a", "gpu"} {
		if _, err := reg.SetProfile(ctx, api.BootProfile{Name: p, Image: img}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := reg.SetRule(ctx, api.BootRule{Name: "r", Vendor: "QEMU", Profile: "nope"}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("a rule with an unknown profile: %v", err)
	}
	// Made in this order, tried by rank: the vendor rule (rank 10) comes
	// after the exact one (rank 5) but before the prefix (20).
	set := func(r api.BootRule) api.BootRule {
		t.Helper()
		out, err := reg.SetRule(ctx, r)
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	if r := set(api.BootRule{Name: "any-qemu", Vendor: "qemu", Profile: "default"}); r.Rank != 10 {
		t.Fatalf("first rule's rank %d", r.Rank)
	}
	if r := set(api.BootRule{Name: "rack-a", MAC: "52:54:00:aa:*", Profile: "rack-a", HostPrefix: "ra"}); r.Rank != 20 {
		t.Fatalf("second rule's rank %d", r.Rank)
	}
	set(api.BootRule{Name: "gpu1", UUID: "6f1c2d3e-0000-4000-8000-0000000000b1", Profile: "gpu", HostName: "gpu1", Rank: 5})
	rs, _ := reg.Rules(ctx)
	if len(rs) != 3 || rs[0].Name != "gpu1" || rs[1].Name != "any-qemu" || rs[2].Name != "rack-a" {
		t.Fatalf("order: %+v", rs)
	}

	cases := []struct {
		mac    string
		claims Claims
		state  string
		rule   string
		host   string
	}{
		{"52:54:00:aa:00:01", Claims{UUID: "6f1c2d3e-0000-4000-8000-0000000000b1", Vendor: "QEMU"}, api.MachineAdmitted, "gpu1", "gpu1"},
		{"52:54:00:aa:00:02", Claims{Vendor: "QEMU"}, api.MachineAdmitted, "any-qemu", "default-aa0002"},
		{"52:54:00:aa:00:03", Claims{Vendor: "Dell Inc."}, api.MachineAdmitted, "rack-a", "ra-aa0003"},
		{"52:54:00:bb:00:04", Claims{Vendor: "Dell Inc."}, api.MachineQuarantined, "", ""},
		// A second machine claiming gpu1's UUID: its first matching rule's
		// name is taken, so it stays quarantined and says why (a later
		// rule would give it a profile nobody meant for it).
		{"52:54:00:bb:00:05", Claims{UUID: "6f1c2d3e-0000-4000-8000-0000000000b1", Vendor: "QEMU"}, api.MachineQuarantined, "", ""},
	}
	for _, c := range cases {
		m, err := reg.seen(ctx, c.mac, c.claims)
		if err != nil {
			t.Fatal(err)
		}
		if m.State != c.state || m.Rule != c.rule || m.HostName != c.host {
			t.Errorf("%s %+v: got %s by %q as %q, want %s by %q as %q", c.mac, c.claims, m.State, m.Rule, m.HostName, c.state, c.rule, c.host)
		}
	}
	if m, _ := reg.Machine(ctx, "52:54:00:bb:00:05"); !strings.Contains(m.LastError, "rule gpu1: host name gpu1 is taken") {
		t.Fatalf("the machine does not say why it waits: %+v", m)
	}
	// An operator's quarantine holds: the rule does not admit it again.
	if _, err := reg.Quarantine(ctx, "52:54:00:aa:00:02"); err != nil {
		t.Fatal(err)
	}
	if m, _ := reg.seen(ctx, "52:54:00:aa:00:02", Claims{Vendor: "QEMU"}); m.State != api.MachineQuarantined || !m.Held {
		t.Fatalf("a held machine was admitted by a rule: %+v", m)
	}
	// An operator's admission lifts the hold and is the operator's.
	if m, err := reg.Admit(ctx, "52:54:00:aa:00:02", api.BootAdmitRequest{Profile: "default", HostName: "h9"}); err != nil || m.Held || m.Rule != "" {
		t.Fatalf("admit: %+v %v", m, err)
	}
	// A rule made after a machine was first seen admits it at its next ask.
	set(api.BootRule{Name: "dell", Vendor: "dell inc.", Profile: "default", HostPrefix: "dell"})
	if m, _ := reg.seen(ctx, "52:54:00:bb:00:04", Claims{}); m.State != api.MachineAdmitted || m.HostName != "dell-bb0004" {
		t.Fatalf("a later rule: %+v", m)
	}
	// Names of hosts that did not boot from the network are not taken.
	if err := reg.Store.Put(ctx, "hosts/default-cc0006", map[string]string{"name": "default-cc0006"}); err != nil {
		t.Fatal(err)
	}
	if m, _ := reg.seen(ctx, "52:54:00:cc:00:06", Claims{Vendor: "QEMU"}); m.State != api.MachineQuarantined {
		t.Fatalf("took a registered host's name: %+v", m)
	}
	if _, err := reg.Admit(ctx, "52:54:00:cc:00:06", api.BootAdmitRequest{Profile: "default", HostName: "default-cc0006"}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("admitted under a registered host's name: %v", err)
	}
	// Deleting a rule keeps what it admitted.
	if err := reg.DeleteRule(ctx, "any-qemu"); err != nil {
		t.Fatal(err)
	}
	if err := reg.DeleteRule(ctx, "any-qemu"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("deleting it again: %v", err)
	}
	if m, _ := reg.Machine(ctx, "52:54:00:aa:00:01"); m.State != api.MachineAdmitted {
		t.Fatalf("deleting a rule quarantined a machine: %+v", m)
	}
}

// Machines whose generated names collide (MACs alike in their last three
// bytes), asking at once through any number of services: one gets the
// name, the other waits quarantined; never both.
func TestRuleNamesNeverShared(t *testing.T) {
	reg := testRegistry(t)
	ctx := context.Background()
	if _, err := reg.SetProfile(ctx, api.BootProfile{Name: "default", Image: fakeImage(t, reg, "a")}); err != nil {
		t.Fatal(err)
	}
	if _, err := reg.SetRule(ctx, api.BootRule{Name: "any", Vendor: "QEMU", Profile: "default", HostPrefix: "rack"}); err != nil {
		t.Fatal(err)
	}
	for round := 0; round < 10; round++ {
		macs := []string{fmt.Sprintf("52:54:00:aa:bb:%02x", round), fmt.Sprintf("52:55:00:aa:bb:%02x", round)}
		var wg sync.WaitGroup
		for _, mac := range macs {
			for k := 0; k < 2; k++ { // two services hear each
				wg.Add(1)
				go func() {
					defer wg.Done()
					if _, err := reg.seen(ctx, mac, Claims{Vendor: "QEMU"}); err != nil {
						t.Error(err)
					}
				}()
			}
		}
		wg.Wait()
		admitted := 0
		for _, mac := range macs {
			m, _ := reg.Machine(ctx, mac)
			if m.State == api.MachineAdmitted {
				admitted++
				if m.HostName != fmt.Sprintf("rack-aabb%02x", round) {
					t.Fatalf("name %q", m.HostName)
				}
			}
		}
		if admitted != 1 {
			t.Fatalf("round %d: %d machines admitted under one name", round, admitted)
		}
	}
	// An operator cannot give a held name either; forgetting its machine
	// frees it.
	ms, _ := reg.Machines(ctx)
	var holder, other string
	for _, m := range ms {
		if m.HostName == "rack-aabb00" {
			holder = m.MAC
		} else if strings.HasSuffix(m.MAC, "aa:bb:00") {
			other = m.MAC
		}
	}
	if _, err := reg.Admit(ctx, other, api.BootAdmitRequest{Profile: "default", HostName: "rack-aabb00"}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("admitted under a held name: %v", err)
	}
	if err := reg.Forget(ctx, holder); err != nil {
		t.Fatal(err)
	}
	if m, err := reg.Admit(ctx, other, api.BootAdmitRequest{Profile: "default", HostName: "rack-aabb00"}); err != nil || m.HostName != "rack-aabb00" {
		t.Fatalf("after the holder was forgotten: %+v %v", m, err)
	}
}
