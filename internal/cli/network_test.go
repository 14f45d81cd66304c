package cli

import (
	"strings"
	"testing"

	"github.com/vigil-project/vigil/api"
)

func TestParseNIC(t *testing.T) {
	for in, want := range map[string]api.NICRequest{
		"default":            {Network: "default"},
		"blue,ip=10.80.0.10": {Network: "blue", IP: "10.80.0.10"},
		"blue, mac=52:54:00:00:00:01,ip=10.80.0.9": {Network: "blue", IP: "10.80.0.9", MAC: "52:54:00:00:00:01"},
	} {
		got, err := parseNIC(in)
		if err != nil || got != want {
			t.Errorf("parseNIC(%q) = %+v, %v; want %+v", in, got, err, want)
		}
	}
	for _, in := range []string{"", ",ip=1.2.3.4", "blue,ip", "blue,ip=", "blue,vlan=3", "blue,ip=1.1.1.1,ip=2.2.2.2"} {
		if _, err := parseNIC(in); err == nil {
			t.Errorf("parseNIC(%q) accepted", in)
		}
	}
}

func TestParsePublish(t *testing.T) {
	for in, want := range map[string]api.PortPublish{
		"8080:80":     {HostPort: 8080, GuestPort: 80},
		"5353:53/udp": {HostPort: 5353, GuestPort: 53, Proto: "udp"},
		"2222:22/tcp": {HostPort: 2222, GuestPort: 22, Proto: "tcp"},
	} {
		got, err := parsePublish(in)
		if err != nil || got != want {
			t.Errorf("parsePublish(%q) = %+v, %v; want %+v", in, got, err, want)
		}
	}
	for _, in := range []string{"80", "a:b", "0:80", "8080:70000", "8080:80/sctp", ""} {
		if _, err := parsePublish(in); err == nil || !strings.Contains(err.Error(), "--publish") {
			t.Errorf("parsePublish(%q) = %v", in, err)
		}
	}
}

func FuzzParseNIC(f *testing.F) {
	f.Add("blue,ip=10.80.0.10,mac=52:54:00:00:00:01")
	f.Fuzz(func(t *testing.T, s string) {
		nic, err := parseNIC(s)
		if err == nil && nic.Network == "" {
			t.Fatalf("parseNIC(%q) gave no network", s)
		}
	})
}

func FuzzParsePublish(f *testing.F) {
	f.Add("8080:80/tcp")
	f.Fuzz(func(t *testing.T, s string) {
		p, err := parsePublish(s)
		if err == nil && (p.HostPort < 1 || p.HostPort > 65535 || p.GuestPort < 1 || p.GuestPort > 65535) {
			t.Fatalf("parsePublish(%q) = %+v", s, p)
		}
	})
}
