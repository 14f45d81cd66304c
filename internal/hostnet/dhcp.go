package hostnet

import (
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv4"
	"github.com/insomniacslk/dhcp/dhcpv4/server4"
)

// leaseTime is what the DHCP server grants. Addresses are reserved for a
// VM's life, so the lease only bounds how long a guest keeps an address
// after its VM is deleted.
const leaseTime = time.Hour

// lease is a VM NIC's reserved address.
type lease struct {
	IP       netip.Addr
	Hostname string
}

// dhcpConfig is what a managed network's DHCP server tells its clients.
type dhcpConfig struct {
	Prefix  netip.Prefix // the subnet
	Gateway netip.Addr   // the router and the server's identity
	DNS     []netip.Addr
}

// dhcpServer answers on one bridge, only for the MACs of this host's VMs:
// hosts of one network share its layer-2 segment, and each one answers
// for the VMs it runs (another host's VMs are in its own table).
type dhcpServer struct {
	log *slog.Logger
	srv *server4.Server

	mu     sync.Mutex
	cfg    dhcpConfig
	leases map[string]lease // by MAC
}

func startDHCP(log *slog.Logger, bridge string, cfg dhcpConfig) (*dhcpServer, error) {
	d := &dhcpServer{log: log.With("bridge", bridge), cfg: cfg, leases: map[string]lease{}}
	srv, err := server4.NewServer(bridge, &net.UDPAddr{Port: dhcpv4.ServerPort}, d.handle)
	if err != nil {
		return nil, fmt.Errorf("serve DHCP on %s: %w", bridge, err)
	}
	d.srv = srv
	go func() { _ = srv.Serve() }() // ends with an error when Close closes its socket
	return d, nil
}

func (d *dhcpServer) close() { _ = d.srv.Close() }

func (d *dhcpServer) configure(cfg dhcpConfig) {
	d.mu.Lock()
	d.cfg = cfg
	d.mu.Unlock()
}

func (d *dhcpServer) reserve(mac net.HardwareAddr, l lease) {
	d.mu.Lock()
	d.leases[mac.String()] = l
	d.mu.Unlock()
}

func (d *dhcpServer) release(mac net.HardwareAddr) {
	d.mu.Lock()
	delete(d.leases, mac.String())
	d.mu.Unlock()
}

func (d *dhcpServer) handle(conn net.PacketConn, peer net.Addr, req *dhcpv4.DHCPv4) {
	d.mu.Lock()
	cfg := d.cfg
	l, ok := d.leases[req.ClientHWAddr.String()]
	d.mu.Unlock()
	if !ok {
		return // another host's VM, or no VM at all
	}
	resp := answer(req, cfg, l)
	if resp == nil {
		return
	}
	if _, err := conn.WriteTo(resp.ToBytes(), peer); err != nil {
		d.log.Warn("dhcp reply not sent", "mac", req.ClientHWAddr.String(), "err", err)
		return
	}
	d.log.Debug("dhcp", "mac", req.ClientHWAddr.String(), "request", req.MessageType().String(),
		"reply", resp.MessageType().String(), "ip", l.IP.String())
}

// answer is the server's reply to req from a client whose reserved lease
// is l, or nil when it should not answer. Discover gets an offer of the
// reserved address; a request for it gets an ack, a request for any other
// address a nak (so a guest that moved or was reverted drops a stale
// lease at once); a release or decline needs nothing.
func answer(req *dhcpv4.DHCPv4, cfg dhcpConfig, l lease) *dhcpv4.DHCPv4 {
	if req.OpCode != dhcpv4.OpcodeBootRequest || len(req.ClientHWAddr) != 6 {
		return nil
	}
	var typ dhcpv4.MessageType
	switch req.MessageType() {
	case dhcpv4.MessageTypeDiscover:
		typ = dhcpv4.MessageTypeOffer
	case dhcpv4.MessageTypeRequest:
		if sid := req.ServerIdentifier(); sid != nil && !sid.Equal(cfg.Gateway.AsSlice()) && !sid.IsUnspecified() {
			return nil // the client chose another server's offer
		}
		want := req.RequestedIPAddress()
		if want == nil || want.IsUnspecified() {
			want = req.ClientIPAddr // renewing
		}
		typ = dhcpv4.MessageTypeAck
		if !want.Equal(l.IP.AsSlice()) {
			typ = dhcpv4.MessageTypeNak
		}
	case dhcpv4.MessageTypeInform:
		typ = dhcpv4.MessageTypeAck
	default:
		return nil
	}
	resp, err := dhcpv4.NewReplyFromRequest(req,
		dhcpv4.WithMessageType(typ),
		dhcpv4.WithServerIP(cfg.Gateway.AsSlice()),
		dhcpv4.WithOption(dhcpv4.OptServerIdentifier(cfg.Gateway.AsSlice())),
	)
	if err != nil {
		return nil
	}
	if typ == dhcpv4.MessageTypeNak {
		return resp
	}
	if req.MessageType() != dhcpv4.MessageTypeInform {
		resp.YourIPAddr = l.IP.AsSlice()
		resp.UpdateOption(dhcpv4.OptIPAddressLeaseTime(leaseTime))
	}
	resp.UpdateOption(dhcpv4.OptSubnetMask(net.CIDRMask(cfg.Prefix.Bits(), 32)))
	resp.UpdateOption(dhcpv4.OptRouter(cfg.Gateway.AsSlice()))
	if len(cfg.DNS) > 0 {
		dns := make([]net.IP, len(cfg.DNS))
		for i, a := range cfg.DNS {
			dns[i] = a.AsSlice()
		}
		resp.UpdateOption(dhcpv4.OptDNS(dns...))
	}
	if l.Hostname != "" {
		resp.UpdateOption(dhcpv4.OptHostName(l.Hostname))
	}
	return resp
}
