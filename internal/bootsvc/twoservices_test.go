package bootsvc

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"testing"

	"github.com/insomniacslk/dhcp/dhcpv4"

	"github.com/vigil-project/vigil/api"
)

// wire is a DHCP server's socket in a test: it keeps what is sent.
type wire struct {
	net.PacketConn
	mu   sync.Mutex
	sent []*dhcpv4.DHCPv4
}

func (w *wire) WriteTo(b []byte, _ net.Addr) (int, error) {
	m, err := dhcpv4.FromBytes(b)
	if err != nil {
		return 0, err
	}
	w.mu.Lock()
	w.sent = append(w.sent, m)
	w.mu.Unlock()
	return len(b), nil
}

func (w *wire) take() []*dhcpv4.DHCPv4 {
	w.mu.Lock()
	defer w.mu.Unlock()
	s := w.sent
	w.sent = nil
	return s
}

// dhcpServer is a boot service as New makes it, at address ip of
// 10.77.0.0/24, on registry reg.
func dhcpServer(reg *Registry, ip string, first, last string) *Server {
	s := &Server{reg: reg, cluster: &fakeCluster{}, log: slog.New(slog.DiscardHandler)}
	s.ip = netip.MustParseAddr(ip)
	s.prefix = netip.MustParsePrefix("10.77.0.0/24")
	s.cfg.First, s.cfg.Last = netip.MustParseAddr(first), netip.MustParseAddr(last)
	s.dhcp = dhcpConfig{ServerIP: s.ip, Prefix: netip.PrefixFrom(s.ip, 24), Bootfile: "http://" + ip + ":8067/boot.ipxe?mac=%s"}
	s.dhcpSlots = make(chan struct{}, 16)
	return s
}

// Two boot services on one boot network, one registry (each on its own
// manager, one etcd): both hear every broadcast and both answer, with the
// same address for a machine; the client takes one offer and only that
// server acks; when one service is gone, the other serves the machine's
// next boot with the same address. Neither is needed by the other.
func TestTwoBootServicesAgree(t *testing.T) {
	reg := testRegistry(t)
	ctx := context.Background()
	if _, err := reg.SetProfile(ctx, api.BootProfile{Name: "default", Image: fakeImage(t, reg, "one")}); err != nil {
		t.Fatal(err)
	}
	a := dhcpServer(reg, "10.77.0.1", "10.77.0.128", "10.77.0.254")
	b := dhcpServer(&Registry{Store: reg.Store, ImagesDir: reg.ImagesDir}, "10.77.0.3", "10.77.0.128", "10.77.0.254")
	wa, wb := &wire{}, &wire{}
	mac, _ := net.ParseMAC("52:54:00:be:ee:01")
	bcast := &net.UDPAddr{IP: net.IPv4bcast, Port: dhcpv4.ClientPort}

	// Several machines at once, each discover heard by both services.
	var macs []net.HardwareAddr
	for i := 0; i < 8; i++ {
		macs = append(macs, net.HardwareAddr{0x52, 0x54, 0, 0xbe, 0xef, byte(i)})
	}
	var wg sync.WaitGroup
	for _, m := range macs {
		d, _ := dhcpv4.NewDiscovery(m, dhcpv4.WithUserClass("iPXE", false))
		for _, s := range []struct {
			srv *Server
			w   *wire
		}{{a, wa}, {b, wb}} {
			wg.Add(1)
			go func() { defer wg.Done(); s.srv.handleDHCP(s.w, bcast, d) }()
		}
	}
	wg.Wait()
	offers := map[string]string{} // mac -> ip
	taken := map[string]string{}  // ip -> mac
	for _, o := range append(wa.take(), wb.take()...) {
		mac, ip := o.ClientHWAddr.String(), o.YourIPAddr.String()
		if prev, ok := offers[mac]; ok && prev != ip {
			t.Fatalf("the two services offered %s two addresses: %s and %s", mac, prev, ip)
		}
		if other, ok := taken[ip]; ok && other != mac {
			t.Fatalf("%s offered to %s and %s", ip, mac, other)
		}
		offers[mac], taken[ip] = ip, mac
	}
	if len(offers) != len(macs) {
		t.Fatalf("offers for %d of %d machines", len(offers), len(macs))
	}

	// The first machine takes a's offer: only a acks; b stays quiet.
	d, _ := dhcpv4.NewDiscovery(mac, dhcpv4.WithUserClass("iPXE", false))
	a.handleDHCP(wa, bcast, d)
	offer := wa.take()[0]
	req, _ := dhcpv4.NewRequestFromOffer(offer, dhcpv4.WithUserClass("iPXE", false))
	a.handleDHCP(wa, bcast, req)
	b.handleDHCP(wb, bcast, req)
	if acks := wa.take(); len(acks) != 1 || acks[0].MessageType() != dhcpv4.MessageTypeAck {
		t.Fatalf("the chosen service: %v", acks)
	}
	if got := wb.take(); len(got) != 0 {
		t.Fatalf("the other service answered a request meant for the first: %v", got)
	}
	// a is gone: b alone serves the next boot, with the same address.
	b.handleDHCP(wb, bcast, d)
	again := wb.take()
	if len(again) != 1 || !again[0].YourIPAddr.Equal(offer.YourIPAddr) {
		t.Fatalf("after the first service went: %v (first offer %s)", again, offer.YourIPAddr)
	}
	req, _ = dhcpv4.NewRequestFromOffer(again[0], dhcpv4.WithUserClass("iPXE", false))
	b.handleDHCP(wb, bcast, req)
	if acks := wb.take(); len(acks) != 1 || acks[0].MessageType() != dhcpv4.MessageTypeAck {
		t.Fatalf("the remaining service: %v", acks)
	}
}
