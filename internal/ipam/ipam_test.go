package ipam

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
)

func TestParseSubnet(t *testing.T) {
	for _, tc := range []struct {
		cidr, gw    string
		wantGateway string
		wantErr     string
	}{
		{cidr: "10.80.0.0/24", wantGateway: "10.80.0.1"},
		{cidr: " 192.168.7.0/24 ", gw: "192.168.7.254", wantGateway: "192.168.7.254"},
		{cidr: "172.16.4.0/30", wantGateway: "172.16.4.1"},
		{cidr: "100.64.0.0/16", wantGateway: "100.64.0.1"},
		{cidr: "10.80.0.1/24", wantErr: "did you mean 10.80.0.0/24"},
		{cidr: "10.80.0.0", wantErr: "not an IPv4 prefix"},
		{cidr: "fd00::/64", wantErr: "only IPv4"},
		{cidr: "10.0.0.0/8", wantErr: "/16 to /30"},
		{cidr: "10.0.0.0/31", wantErr: "/16 to /30"},
		{cidr: "8.8.8.0/24", wantErr: "private range"},
		{cidr: "127.0.0.0/24", wantErr: "private range"},
		{cidr: "10.80.0.0/24", gw: "10.80.1.1", wantErr: "not a host address"},
		{cidr: "10.80.0.0/24", gw: "10.80.0.255", wantErr: "not a host address"},
		{cidr: "10.80.0.0/24", gw: "10.80.0.0", wantErr: "not a host address"},
		{cidr: "10.80.0.0/24", gw: "gateway", wantErr: "not an IPv4 address"},
	} {
		s, err := ParseSubnet(tc.cidr, tc.gw)
		if tc.wantErr != "" {
			if err == nil || !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("ParseSubnet(%q, %q) = %v, want an invalid error saying %q", tc.cidr, tc.gw, err, tc.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("ParseSubnet(%q, %q): %v", tc.cidr, tc.gw, err)
			continue
		}
		if s.Gateway.String() != tc.wantGateway {
			t.Errorf("ParseSubnet(%q, %q).Gateway = %s, want %s", tc.cidr, tc.gw, s.Gateway, tc.wantGateway)
		}
	}
}

func mustSubnet(t *testing.T, cidr, gw string) Subnet {
	t.Helper()
	s, err := ParseSubnet(cidr, gw)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestCheck(t *testing.T) {
	s := mustSubnet(t, "10.80.0.0/24", "")
	for addr, want := range map[string]string{
		"10.80.0.10":  "",
		"10.80.0.254": "",
		"10.80.0.0":   "network address",
		"10.80.0.255": "broadcast address",
		"10.80.0.1":   "gateway",
		"10.80.1.5":   "outside",
		"::1":         "outside",
	} {
		err := s.Check(netip.MustParseAddr(addr))
		if want == "" && err != nil || want != "" && (err == nil || !strings.Contains(err.Error(), want)) {
			t.Errorf("Check(%s) = %v, want %q", addr, err, want)
		}
	}
	if b := s.Broadcast().String(); b != "10.80.0.255" {
		t.Errorf("Broadcast = %s", b)
	}
	if n := s.Size(); n != 253 {
		t.Errorf("Size = %d, want 253", n)
	}
	if m := s.Mask().String(); m != "ffffff00" {
		t.Errorf("Mask = %s", m)
	}
}

func TestNext(t *testing.T) {
	s := mustSubnet(t, "10.80.0.0/29", "10.80.0.3") // hosts .1-.6, gateway .3
	taken := map[netip.Addr]bool{}
	var got []string
	for {
		a, err := s.Next(func(a netip.Addr) bool { return taken[a] })
		if err != nil {
			if !errors.Is(err, ErrExhausted) {
				t.Fatalf("Next: %v", err)
			}
			break
		}
		taken[a] = true
		got = append(got, a.String())
	}
	want := []string{"10.80.0.4", "10.80.0.5", "10.80.0.6", "10.80.0.1", "10.80.0.2"}
	if len(got) != len(want) {
		t.Fatalf("handed out %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("handed out %v, want %v", got, want)
		}
	}
	if len(got) != s.Size() {
		t.Errorf("handed out %d, Size says %d", len(got), s.Size())
	}
}

func TestOverlaps(t *testing.T) {
	s := mustSubnet(t, "10.80.0.0/24", "")
	for cidr, want := range map[string]bool{
		"10.80.0.0/24":   true,
		"10.80.0.128/25": true,
		"10.80.0.0/16":   true,
		"10.81.0.0/24":   false,
	} {
		if got := s.Overlaps(netip.MustParsePrefix(cidr)); got != want {
			t.Errorf("Overlaps(%s) = %v, want %v", cidr, got, want)
		}
	}
}

func TestMAC(t *testing.T) {
	a := MAC("6f0c7d1e-0000-4000-8000-000000000001", 0, 0)
	if a.String() != MAC("6f0c7d1e-0000-4000-8000-000000000001", 0, 0).String() {
		t.Fatal("MAC is not stable")
	}
	if a[0] != 0x52 || a[1] != 0x54 || a[2] != 0 {
		t.Fatalf("MAC %s lacks QEMU's prefix", a)
	}
	if MAC("6f0c7d1e-0000-4000-8000-000000000001", 1, 0).String() == a.String() ||
		MAC("6f0c7d1e-0000-4000-8000-000000000001", 0, 1).String() == a.String() {
		t.Fatal("NICs or attempts share a MAC")
	}
	if _, err := ParseMAC(a.String()); err != nil {
		t.Fatalf("ParseMAC(%s): %v", a, err)
	}
}

func TestParseMAC(t *testing.T) {
	for s, ok := range map[string]bool{
		"52:54:00:12:34:56": true,
		"02-00-00-00-00-01": true,
		"01:00:5e:00:00:01": false, // multicast
		"ff:ff:ff:ff:ff:ff": false,
		"00:00:00:00:00:00": false,
		"52:54:00:12:34":    false,
		"00:00:00:00:fe:80:00:00:00:00:00:00:02:00:5e:10:00:00:00:01": false,
		"nonsense": false,
	} {
		_, err := ParseMAC(s)
		if ok != (err == nil) {
			t.Errorf("ParseMAC(%q) = %v, want ok=%v", s, err, ok)
		}
	}
}

func FuzzParseSubnet(f *testing.F) {
	f.Add("10.80.0.0/24", "")
	f.Add("192.168.0.0/30", "192.168.0.2")
	f.Add("10.0.0.0/16", "10.0.255.254")
	f.Fuzz(func(t *testing.T, cidr, gw string) {
		s, err := ParseSubnet(cidr, gw)
		if err != nil {
			return
		}
		if !s.host(s.Gateway) {
			t.Fatalf("gateway %s of %s is not a host address", s.Gateway, s.Prefix)
		}
		a, err := s.Next(func(netip.Addr) bool { return false })
		if err != nil {
			t.Fatalf("Next on an empty %s: %v", s.Prefix, err)
		}
		if err := s.Check(a); err != nil {
			t.Fatalf("Next gave %s, which Check refuses: %v", a, err)
		}
	})
}
