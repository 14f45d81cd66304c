package hostnet

import (
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// TestVXLAN joins this namespace's managed network to a second namespace,
// host B, over VXLAN on a veth underlay. Host B is wired by hand with ip(8)
// as another machine's bridge would be; a fake guest here reaches a guest
// address there through the tunnel both ways, while this host's own frames
// (its gateway's ARP answers) do not leave through it.
func TestVXLAN(t *testing.T) {
	needNetNS(t)
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("needs ip(8) to wire the peer namespace")
	}
	b := fmt.Sprintf("vigil-vxb-%d", os.Getpid())
	ip := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	ip("netns", "add", b)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", b).Run() })
	ip("link", "add", "vxu0", "type", "veth", "peer", "name", "vxu1", "netns", b)
	ip("addr", "add", "192.168.77.1/24", "dev", "vxu0")
	ip("link", "set", "vxu0", "up")
	for _, args := range [][]string{
		{"link", "set", "lo", "up"},
		{"addr", "add", "192.168.77.2/24", "dev", "vxu1"},
		{"link", "set", "vxu1", "up"},
		{"link", "add", "br0", "type", "bridge"},
		{"link", "set", "br0", "up"},
		{"link", "add", "vx0", "type", "vxlan", "id", "4242", "local", "192.168.77.2", "dstport", "4789"},
		{"link", "set", "vx0", "master", "br0"},
		{"link", "set", "vx0", "up"},
		{"link", "add", "guest0", "type", "veth", "peer", "name", "guest1"},
		{"link", "set", "guest0", "master", "br0"},
		{"link", "set", "guest0", "up"},
		{"addr", "add", "10.85.0.20/24", "dev", "guest1"},
		{"link", "set", "guest1", "up"},
	} {
		ip(append([]string{"-n", b}, args...)...)
	}
	if out, err := exec.Command("ip", "netns", "exec", b, "bridge", "fdb", "append", "00:00:00:00:00:00", "dev", "vx0", "dst", "192.168.77.1").CombinedOutput(); err != nil {
		t.Fatalf("bridge fdb append: %v: %s", err, out)
	}

	h := New(slog.New(slog.NewTextHandler(testWriter{t}, nil)), "h1")
	t.Cleanup(h.Close)
	n := Network{Name: "vx", Subnet: netip.MustParsePrefix("10.85.0.0/24"), Gateway: netip.MustParseAddr("10.85.0.1"),
		VNI: 4242, Local: netip.MustParseAddr("192.168.77.1"), Peers: []netip.Addr{netip.MustParseAddr("192.168.77.2")}}
	if err := h.EnsureNetwork(n); err != nil {
		t.Fatal(err)
	}
	nic := NIC{VM: "a", Network: "vx", MAC: mustMAC("52:54:00:00:00:2a"), IP: netip.MustParseAddr("10.85.0.10")}
	tap, err := h.Plug(nic)
	if err != nil {
		t.Fatal(err)
	}
	a := &vm{fakeNIC: openTap(t, tap, nic.MAC), ip: nic.IP}
	remote := netip.MustParseAddr("10.85.0.20")
	var answered bool
	for i := 0; i < 5 && !answered; i++ {
		a.send(t, ether(broadcastMAC, a.mac, etherTypeARP, arpFrame(1, a.mac, a.ip, make([]byte, 6), remote)))
		answered = a.await(t, time.Second, func(f []byte) bool {
			op, _, spa, tpa, ok := arpOf(f)
			return ok && op == 2 && spa == remote && tpa == a.ip
		})
	}
	if !answered {
		t.Fatal("the guest on the other host never answered through the VXLAN tunnel")
	}
	// Host B's guest asks for the gateway: only its own host may answer,
	// and B has none, so nothing comes back through the tunnel.
	out, err := exec.Command("ip", "netns", "exec", b, "ping", "-c", "2", "-W", "1", "-I", "guest1", "10.85.0.1").CombinedOutput()
	if err == nil {
		t.Fatalf("host B's guest reached host A's gateway through the tunnel:\n%s", out)
	}

	// Peers change: the flooding entry follows.
	n.Peers = []netip.Addr{netip.MustParseAddr("192.168.77.3")}
	if err := h.EnsureNetwork(n); err != nil {
		t.Fatal(err)
	}
	fdb, _ := exec.Command("bridge", "fdb", "show", "dev", VXLANName("vx")).CombinedOutput()
	if !strings.Contains(string(fdb), "00:00:00:00:00:00 dst 192.168.77.3") || strings.Contains(string(fdb), "00:00:00:00:00:00 dst 192.168.77.2") {
		t.Fatalf("flooding entries after a peer change:\n%s", fdb)
	}
}
