package hostnet

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv4"
)

var testCfg = dhcpConfig{Prefix: netip.MustParsePrefix("10.80.0.0/24"), Gateway: netip.MustParseAddr("10.80.0.1")}
var testLease = lease{IP: netip.MustParseAddr("10.80.0.10"), Hostname: "web"}

func TestAnswer(t *testing.T) {
	mac := mustMAC("52:54:00:00:00:0a")
	msg := func(typ dhcpv4.MessageType, mods ...dhcpv4.Modifier) *dhcpv4.DHCPv4 {
		m, err := dhcpv4.New(append([]dhcpv4.Modifier{dhcpv4.WithHwAddr(mac), dhcpv4.WithMessageType(typ)}, mods...)...)
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	for _, tc := range []struct {
		name string
		req  *dhcpv4.DHCPv4
		want dhcpv4.MessageType // MessageTypeNone: no answer
	}{
		{"discover", msg(dhcpv4.MessageTypeDiscover), dhcpv4.MessageTypeOffer},
		{"request reserved", msg(dhcpv4.MessageTypeRequest, dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(net.ParseIP("10.80.0.10")))), dhcpv4.MessageTypeAck},
		{"renew", msg(dhcpv4.MessageTypeRequest, dhcpv4.WithClientIP(net.ParseIP("10.80.0.10"))), dhcpv4.MessageTypeAck},
		{"request another", msg(dhcpv4.MessageTypeRequest, dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(net.ParseIP("10.80.0.99")))), dhcpv4.MessageTypeNak},
		{"another server chosen", msg(dhcpv4.MessageTypeRequest, dhcpv4.WithOption(dhcpv4.OptServerIdentifier(net.ParseIP("10.80.0.2"))),
			dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(net.ParseIP("10.80.0.10")))), dhcpv4.MessageTypeNone},
		{"release", msg(dhcpv4.MessageTypeRelease), dhcpv4.MessageTypeNone},
		{"inform", msg(dhcpv4.MessageTypeInform, dhcpv4.WithClientIP(net.ParseIP("10.80.0.10"))), dhcpv4.MessageTypeAck},
	} {
		got := answer(tc.req, testCfg, testLease)
		if tc.want == dhcpv4.MessageTypeNone {
			if got != nil {
				t.Errorf("%s: answered %s, want nothing", tc.name, got.MessageType())
			}
			continue
		}
		if got == nil || got.MessageType() != tc.want {
			t.Errorf("%s: answered %v, want %s", tc.name, got, tc.want)
			continue
		}
		if !got.ServerIdentifier().Equal(net.ParseIP("10.80.0.1")) {
			t.Errorf("%s: server identifier %v", tc.name, got.ServerIdentifier())
		}
		if tc.want == dhcpv4.MessageTypeOffer || tc.want == dhcpv4.MessageTypeAck && tc.name != "inform" {
			if !got.YourIPAddr.Equal(net.ParseIP("10.80.0.10")) || got.IPAddressLeaseTime(0) != leaseTime || got.HostName() != "web" {
				t.Errorf("%s: %s", tc.name, got.Summary())
			}
		}
	}
}

// FuzzAnswer feeds the server anything a guest could send.
func FuzzAnswer(f *testing.F) {
	d, _ := dhcpv4.New(dhcpv4.WithHwAddr(mustMAC("52:54:00:00:00:0a")), dhcpv4.WithMessageType(dhcpv4.MessageTypeDiscover))
	f.Add(d.ToBytes())
	r, _ := dhcpv4.New(dhcpv4.WithHwAddr(mustMAC("52:54:00:00:00:0a")), dhcpv4.WithMessageType(dhcpv4.MessageTypeRequest),
		dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(net.ParseIP("10.80.0.10"))))
	f.Add(r.ToBytes())
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := dhcpv4.FromBytes(b)
		if err != nil {
			return
		}
		resp := answer(m, testCfg, testLease)
		if resp == nil {
			return
		}
		if resp.MessageType() == dhcpv4.MessageTypeOffer && !resp.YourIPAddr.Equal(net.ParseIP("10.80.0.10")) {
			t.Fatalf("offered %s", resp.YourIPAddr)
		}
		if _, err := dhcpv4.FromBytes(resp.ToBytes()); err != nil {
			t.Fatalf("the answer does not parse: %v", err)
		}
	})
}

// FuzzHeard feeds the ARP prober anything a guest could send: it must
// never panic, and only a reply from the watched address and its own MAC
// counts as an answer.
func FuzzHeard(f *testing.F) {
	mac := mustMAC("52:54:00:00:00:0a")
	ip := netip.MustParseAddr("10.80.0.10")
	f.Add(arpFrame(2, mac, ip, mustMAC("02:00:00:00:00:01"), netip.MustParseAddr("10.80.0.1")))
	f.Add(arpFrame(1, mac, ip, make([]byte, 6), ip))
	f.Add([]byte{0, 1, 8, 0, 6, 4})
	f.Fuzz(func(t *testing.T, b []byte) {
		p := &prober{targets: map[netip.Addr]*target{ip: {mac: mac}}}
		p.heard(b, time.Unix(1, 0))
		if at := p.answered(ip); !at.IsZero() {
			op, sha, spa, _, ok := arpOf(ether(broadcastMAC, mac, etherTypeARP, b))
			if !ok || spa != ip || sha.String() != mac.String() || op == 0 {
				t.Fatalf("counted as an answer: %x", b)
			}
		}
	})
}
