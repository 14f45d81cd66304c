package hostnet

import (
	"encoding/binary"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv4"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

var broadcastMAC = net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}

// vm is a fake guest on a tap: it answers ARP for its address while the
// test waits for frames, as a guest's kernel would.
type vm struct {
	*fakeNIC
	ip netip.Addr
}

func (v *vm) await(t *testing.T, d time.Duration, match func([]byte) bool) bool {
	return v.fakeNIC.await(d, func(f []byte) bool {
		if op, sha, spa, tpa, ok := arpOf(f); ok && op == 1 && tpa == v.ip {
			v.send(t, ether(sha, v.mac, etherTypeARP, arpFrame(2, v.mac, v.ip, sha, spa)))
		}
		return match(f)
	})
}

func isEchoReply(from netip.Addr, id uint16) func([]byte) bool {
	return func(f []byte) bool {
		src, _, proto, p, ok := ipv4Of(f)
		return ok && proto == unix.IPPROTO_ICMP && src == from && len(p) >= 8 && p[0] == 0 && binary.BigEndian.Uint16(p[4:]) == id
	}
}

func mustMAC(s string) net.HardwareAddr {
	m, err := net.ParseMAC(s)
	if err != nil {
		panic(err)
	}
	return m
}

func TestHostNetworks(t *testing.T) {
	needNetNS(t)
	log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	h := New(log, "h1")
	t.Cleanup(h.Close)
	blue := Network{Name: "blue", Subnet: netip.MustParsePrefix("10.80.0.0/24"), Gateway: netip.MustParseAddr("10.80.0.1"),
		DNS: []netip.Addr{netip.MustParseAddr("10.80.0.1")}}
	red := Network{Name: "red", Subnet: netip.MustParsePrefix("10.81.0.0/24"), Gateway: netip.MustParseAddr("10.81.0.1")}
	for _, n := range []Network{blue, red} {
		if err := h.EnsureNetwork(n); err != nil {
			t.Fatalf("EnsureNetwork(%s): %v", n.Name, err)
		}
	}
	if err := h.EnsureNetwork(blue); err != nil {
		t.Fatalf("EnsureNetwork is not idempotent: %v", err)
	}
	plug := func(name, network, mac, ip string) *vm {
		t.Helper()
		nic := NIC{VM: name, Network: network, MAC: mustMAC(mac), IP: netip.MustParseAddr(ip), Hostname: name}
		tap, err := h.Plug(nic)
		if err != nil {
			t.Fatalf("Plug(%s): %v", name, err)
		}
		return &vm{fakeNIC: openTap(t, tap, nic.MAC), ip: nic.IP}
	}
	a := plug("a", "blue", "52:54:00:00:00:0a", "10.80.0.10")
	b := plug("b", "blue", "52:54:00:00:00:0b", "10.80.0.11")
	c := plug("c", "red", "52:54:00:00:00:0c", "10.81.0.10")
	gwMAC := GatewayMAC("blue")

	t.Run("dhcp gives the reserved address", func(t *testing.T) {
		disc, err := dhcpv4.New(dhcpv4.WithHwAddr(a.mac), dhcpv4.WithMessageType(dhcpv4.MessageTypeDiscover), dhcpv4.WithBroadcast(true))
		if err != nil {
			t.Fatal(err)
		}
		var offer *dhcpv4.DHCPv4
		exchange := func(req *dhcpv4.DHCPv4, want dhcpv4.MessageType) *dhcpv4.DHCPv4 {
			t.Helper()
			a.send(t, ether(broadcastMAC, a.mac, etherTypeIPv4,
				ipv4Packet(netip.IPv4Unspecified(), netip.MustParseAddr("255.255.255.255"), unix.IPPROTO_UDP, udpPacket(68, 67, req.ToBytes()))))
			var got *dhcpv4.DHCPv4
			a.await(t, 3*time.Second, func(f []byte) bool {
				_, _, proto, p, ok := ipv4Of(f)
				if !ok || proto != unix.IPPROTO_UDP || len(p) < 8 || binary.BigEndian.Uint16(p[2:]) != 68 {
					return false
				}
				m, err := dhcpv4.FromBytes(p[8:])
				if err != nil || m.TransactionID != req.TransactionID {
					return false
				}
				got = m
				return true
			})
			if got == nil {
				t.Fatalf("no answer to DHCP %s", req.MessageType())
			}
			if got.MessageType() != want {
				t.Fatalf("DHCP %s answered %s, want %s", req.MessageType(), got.MessageType(), want)
			}
			return got
		}
		offer = exchange(disc, dhcpv4.MessageTypeOffer)
		if !offer.YourIPAddr.Equal(net.ParseIP("10.80.0.10")) || !offer.Router()[0].Equal(net.ParseIP("10.80.0.1")) ||
			offer.SubnetMask().String() != "ffffff00" || offer.HostName() != "a" {
			t.Fatalf("offer: %s", offer.Summary())
		}
		req, err := dhcpv4.NewRequestFromOffer(offer)
		if err != nil {
			t.Fatal(err)
		}
		exchange(req, dhcpv4.MessageTypeAck)
		wrong, _ := dhcpv4.New(dhcpv4.WithHwAddr(a.mac), dhcpv4.WithMessageType(dhcpv4.MessageTypeRequest),
			dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(net.ParseIP("10.80.0.77"))), dhcpv4.WithBroadcast(true))
		exchange(wrong, dhcpv4.MessageTypeNak)
	})

	ping := func(from *vm, srcMAC net.HardwareAddr, src netip.Addr, id uint16) bool {
		from.send(t, ether(gwMAC, srcMAC, etherTypeIPv4, ipv4Packet(src, blue.Gateway, unix.IPPROTO_ICMP, icmpEcho(id, 1))))
		return from.await(t, 1500*time.Millisecond, isEchoReply(blue.Gateway, id))
	}
	t.Run("a VM reaches its gateway", func(t *testing.T) {
		if !ping(a, a.mac, a.ip, 1) {
			t.Fatal("no echo reply from the gateway")
		}
	})
	t.Run("spoofed addresses are dropped", func(t *testing.T) {
		if ping(a, a.mac, netip.MustParseAddr("10.80.0.11"), 2) {
			t.Error("a packet with b's address went through")
		}
		if ping(a, b.mac, a.ip, 3) {
			t.Error("a frame with b's MAC went through")
		}
		// ARP claiming b's address.
		a.send(t, ether(broadcastMAC, a.mac, etherTypeARP, arpFrame(2, a.mac, b.ip, broadcastMAC, b.ip)))
		if b.await(t, time.Second, func(f []byte) bool { _, _, spa, _, ok := arpOf(f); return ok && spa == b.ip }) {
			t.Error("a gratuitous ARP claiming b's address went through")
		}
		// VLAN-tagged frames, and a rogue DHCP server.
		a.send(t, ether(b.mac, a.mac, 0x8100, make([]byte, 46)))
		a.send(t, ether(broadcastMAC, a.mac, etherTypeIPv4, ipv4Packet(a.ip, netip.MustParseAddr("255.255.255.255"), unix.IPPROTO_UDP, udpPacket(67, 68, make([]byte, 240)))))
		if b.await(t, time.Second, func(f []byte) bool { return frameType(f) == 0x8100 || frameType(f) == etherTypeIPv4 }) {
			t.Error("a tagged frame or a DHCP answer from a VM went through")
		}
	})
	t.Run("VMs of one network reach each other", func(t *testing.T) {
		a.send(t, ether(b.mac, a.mac, etherTypeIPv4, ipv4Packet(a.ip, b.ip, unix.IPPROTO_ICMP, icmpEcho(9, 1))))
		if !b.await(t, 2*time.Second, func(f []byte) bool { src, dst, _, _, ok := ipv4Of(f); return ok && src == a.ip && dst == b.ip }) {
			t.Fatal("b never saw a's packet")
		}
	})
	t.Run("networks are isolated", func(t *testing.T) {
		a.send(t, ether(gwMAC, a.mac, etherTypeIPv4, ipv4Packet(a.ip, c.ip, unix.IPPROTO_ICMP, icmpEcho(10, 1))))
		if c.await(t, 2*time.Second, func(f []byte) bool { src, dst, _, _, ok := ipv4Of(f); return ok && src == a.ip && dst == c.ip }) {
			t.Fatal("a packet from network blue was routed into network red")
		}
		a.send(t, ether(gwMAC, a.mac, etherTypeIPv4, ipv4Packet(a.ip, red.Gateway, unix.IPPROTO_ICMP, icmpEcho(11, 1))))
		if a.await(t, 1500*time.Millisecond, isEchoReply(red.Gateway, 11)) {
			t.Fatal("a VM of network blue reached network red's gateway")
		}
	})
	t.Run("the kernel's ARP answers are seen", func(t *testing.T) {
		tapA := TapName("h1", "a", 0)
		silent := plug("silent", "blue", "52:54:00:00:00:0e", "10.80.0.14")   // never reads its tap
		a.await(t, 2500*time.Millisecond, func([]byte) bool { return false }) // answers the probes
		at, ok := h.Answered(tapA)
		if !ok || at.IsZero() || time.Since(at) > 2*time.Second {
			t.Fatalf("a answered ARP but Answered says %v, %v", at, ok)
		}
		if at, ok := h.Answered(TapName("h1", "silent", 0)); !ok || !at.IsZero() {
			t.Fatalf("a guest that never answered ARP: Answered says %v, %v", at, ok)
		}
		_ = silent
		cnt, err := TapCounters(tapA)
		if err != nil || cnt.RxPackets == 0 || cnt.TxPackets == 0 {
			t.Fatalf("tap counters %+v, %v", cnt, err)
		}
	})

	t.Run("bad input", func(t *testing.T) {
		if _, err := h.Plug(NIC{VM: "d", Network: "green", MAC: mustMAC("52:54:00:00:00:0d"), IP: netip.MustParseAddr("10.80.0.12")}); err == nil {
			t.Error("Plug onto an unknown network worked")
		}
		if _, err := h.Plug(NIC{VM: "d", Network: "blue", MAC: mustMAC("52:54:00:00:00:0d"), IP: a.ip}); err == nil || !strings.Contains(err.Error(), "already used by a") {
			t.Errorf("Plug with a's address: %v", err)
		}
		if _, err := netlink.LinkByName(TapName("h1", "d", 0)); err == nil {
			t.Error("a refused Plug left a tap behind")
		}
		err := h.EnsureNetwork(Network{Name: "lan", Bridge: "br-missing"})
		if !errors.Is(err, ErrNoBridge) || !strings.Contains(err.Error(), "does not exist") {
			t.Errorf("EnsureNetwork on a missing bridge: %v", err)
		}
		if err := h.RemoveNetwork("blue"); err == nil || !strings.Contains(err.Error(), "in use") {
			t.Errorf("RemoveNetwork of a network in use: %v", err)
		}
	})

	t.Run("unplug and remove", func(t *testing.T) {
		for _, v := range []string{"a", "b", "silent"} {
			if err := h.Unplug(TapName("h1", v, 0)); err != nil {
				t.Fatal(err)
			}
		}
		if err := h.RemoveNetwork("blue"); err != nil {
			t.Fatal(err)
		}
		if _, err := netlink.LinkByName(BridgeName("blue")); err == nil {
			t.Error("the bridge of a removed network is still there")
		}
	})
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}
