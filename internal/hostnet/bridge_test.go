package hostnet

import (
	"log/slog"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// TestOperatorBridge puts VMs on a bridge the operator runs: their taps
// join it, a VM cannot send with another's MAC (addresses come from the
// operator's DHCP, so only the MAC is Vigil's to enforce), and removing the
// network leaves the operator's bridge alone.
func TestOperatorBridge(t *testing.T) {
	needNetNS(t)
	attrs := netlink.NewLinkAttrs()
	attrs.Name = "br-op"
	if err := netlink.LinkAdd(&netlink.Bridge{LinkAttrs: attrs}); err != nil {
		t.Fatal(err)
	}
	br, err := netlink.LinkByName("br-op")
	if err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetUp(br); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = netlink.LinkDel(br) })
	h := New(slog.New(slog.NewTextHandler(testWriter{t}, nil)), "h9")
	t.Cleanup(h.Close)
	if err := h.EnsureNetwork(Network{Name: "lan", Bridge: "br-op"}); err != nil {
		t.Fatalf("EnsureNetwork on the operator's bridge: %v", err)
	}
	plug := func(name, mac string) *fakeNIC {
		t.Helper()
		nic := NIC{VM: name, Network: "lan", MAC: mustMAC(mac), Hostname: name}
		tap, err := h.Plug(nic)
		if err != nil {
			t.Fatalf("Plug(%s): %v", name, err)
		}
		l, err := netlink.LinkByName(tap)
		if err != nil {
			t.Fatal(err)
		}
		if l.Attrs().MasterIndex != br.Attrs().Index {
			t.Fatalf("tap %s is not on br-op", tap)
		}
		return openTap(t, tap, nic.MAC)
	}
	a := plug("oa", "52:54:00:00:01:0a")
	b := plug("ob", "52:54:00:00:01:0b")
	// fromA sends a frame from a's tap with src as its source, a few
	// times (a port just attached may not forward the very first), and
	// tells whether b saw it.
	fromA := func(src net.HardwareAddr, id uint16) bool {
		for range 5 {
			a.send(t, ether(b.mac, src, etherTypeIPv4, ipv4Packet(netip.MustParseAddr("192.0.2.10"), netip.MustParseAddr("192.0.2.11"), unix.IPPROTO_ICMP, icmpEcho(id, 1))))
			if b.await(500*time.Millisecond, func(f []byte) bool {
				_, _, proto, p, ok := ipv4Of(f)
				return ok && proto == unix.IPPROTO_ICMP && len(p) >= 8 && p[4] == byte(id>>8) && p[5] == byte(id)
			}) {
				return true
			}
		}
		return false
	}
	if !fromA(a.mac, 0x0101) {
		t.Fatal("b never saw a frame a sent with its own MAC")
	}
	if fromA(mustMAC("52:54:00:00:01:0c"), 0x0202) {
		t.Error("a frame with a MAC that is not a's went through")
	}
	if _, err := h.Plug(NIC{VM: "oc", Network: "lan", MAC: a.mac}); err == nil {
		t.Error("a second VM got a's MAC on the same bridge")
	}
	for _, v := range []string{"oa", "ob"} {
		if err := h.Unplug(TapName("h9", v, 0)); err != nil {
			t.Fatal(err)
		}
	}
	if err := h.RemoveNetwork("lan"); err != nil {
		t.Fatal(err)
	}
	if _, err := netlink.LinkByName("br-op"); err != nil {
		t.Fatalf("removing the network took the operator's bridge: %v", err)
	}
}
