package bootsvc

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"sync"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv4"
	"github.com/insomniacslk/dhcp/dhcpv4/server4"
	"golang.org/x/net/netutil"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/pki"
)

// Config is where and how a boot service serves.
type Config struct {
	// Interface is the boot network's interface; the service answers
	// DHCP and listens only there.
	Interface string
	// First and Last bound the addresses given to machines (zero: the
	// upper half of the interface's subnet).
	First, Last netip.Addr
	// HTTPPort serves iPXE (plain HTTP: images and scripts, nothing
	// secret); TLSPort serves configurations.
	HTTPPort, TLSPort int
	// ManagerURLs are what hosts are told to join (reachable from the
	// boot network).
	ManagerURLs []string
	// ProxyDHCP: the boot network has a DHCP server of its own, which
	// gives the addresses; this service only tells iPXE where to boot
	// from (ProxyDHCP, on ports 67 and 4011) and gives no address.
	ProxyDHCP bool
}

// Cluster is what the boot service needs of the manager.
type Cluster interface {
	// JoinToken makes a one-use token admitting host (its name only).
	JoinToken(ctx context.Context, host string) (api.JoinToken, error)
	// RevokeJoinToken deletes token id unless it was used.
	RevokeJoinToken(ctx context.Context, id string) error
}

// Server is a running boot service.
type Server struct {
	cfg         Config
	reg         *Registry
	ca          *pki.CA
	tlsConfig   *tls.Config
	cluster     Cluster
	log         *slog.Logger
	managerURLs []string

	ip        netip.Addr
	prefix    netip.Prefix
	tlsAddr   string
	dhcp      dhcpConfig
	dhcpSlots chan struct{}
}

// New checks cfg against the interface and makes a server.
func New(cfg Config, reg *Registry, ca *pki.CA, tlsConfig *tls.Config, cluster Cluster, log *slog.Logger) (*Server, error) {
	ifi, err := net.InterfaceByName(cfg.Interface)
	if err != nil {
		return nil, fmt.Errorf("boot interface %s: %w", cfg.Interface, err)
	}
	addrs, err := ifi.Addrs()
	if err != nil {
		return nil, fmt.Errorf("boot interface %s: %w", cfg.Interface, err)
	}
	var prefix netip.Prefix
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok {
			if p, err := netip.ParsePrefix(n.String()); err == nil && p.Addr().Is4() {
				prefix = p
				break
			}
		}
	}
	if !prefix.IsValid() {
		return nil, fmt.Errorf("boot interface %s has no IPv4 address: give it one (the boot service answers from it)", cfg.Interface)
	}
	if len(cfg.ManagerURLs) == 0 {
		return nil, errors.New("boot service: no manager urls for hosts to join")
	}
	s := &Server{cfg: cfg, reg: reg, ca: ca, tlsConfig: tlsConfig, cluster: cluster, log: log.With("boot_interface", cfg.Interface),
		managerURLs: cfg.ManagerURLs, ip: prefix.Addr(), prefix: prefix.Masked(), dhcpSlots: make(chan struct{}, 16)}
	if !s.cfg.First.IsValid() {
		s.cfg.First, s.cfg.Last = upperHalf(s.prefix)
	}
	if !s.prefix.Contains(s.cfg.First) || !s.prefix.Contains(s.cfg.Last) || s.cfg.Last.Less(s.cfg.First) {
		return nil, fmt.Errorf("boot range %s-%s is not inside %s", s.cfg.First, s.cfg.Last, s.prefix)
	}
	s.tlsAddr = net.JoinHostPort(s.ip.String(), strconv.Itoa(cfg.TLSPort))
	s.dhcp = dhcpConfig{ServerIP: s.ip, Prefix: prefix,
		Bootfile: "http://" + net.JoinHostPort(s.ip.String(), strconv.Itoa(cfg.HTTPPort)) + "/boot.ipxe?mac=%s"}
	return s, nil
}

// upperHalf is the upper half of p's addresses, without the broadcast.
func upperHalf(p netip.Prefix) (netip.Addr, netip.Addr) {
	b := p.Addr().As4()
	host := 32 - p.Bits()
	size := uint32(1) << host
	base := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
	first, last := base+size/2, base+size-2
	if size < 4 {
		first, last = base+1, base+size-1
	}
	u := func(v uint32) netip.Addr {
		return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
	}
	return u(first), u(last)
}

// Serve runs a boot service until ctx ends. The interface may get its
// address after the service starts: it tries again until it runs.
func Serve(ctx context.Context, cfg Config, reg *Registry, ca *pki.CA, tlsConfig *tls.Config, cluster Cluster, log *slog.Logger) {
	for {
		srv, err := New(cfg, reg, ca, tlsConfig, cluster, log)
		if err == nil {
			err = srv.Run(ctx)
		}
		if ctx.Err() != nil {
			return
		}
		log.Error("boot service not running; trying again in 10 s", "err", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(10 * time.Second):
		}
	}
}

// Run serves until ctx ends.
func (s *Server) Run(ctx context.Context) error {
	httpL, err := net.Listen("tcp", net.JoinHostPort(s.ip.String(), strconv.Itoa(s.cfg.HTTPPort)))
	if err != nil {
		return fmt.Errorf("boot service http: %w", err)
	}
	tlsL, err := net.Listen("tcp", s.tlsAddr)
	if err != nil {
		httpL.Close()
		return fmt.Errorf("boot service tls: %w", err)
	}
	dhcpSrv, err := server4.NewServer(s.cfg.Interface, &net.UDPAddr{Port: dhcpv4.ServerPort}, s.handleDHCP)
	if err != nil {
		httpL.Close()
		tlsL.Close()
		return fmt.Errorf("boot service dhcp on %s: %w", s.cfg.Interface, err)
	}
	var proxySrv *server4.Server
	if s.cfg.ProxyDHCP {
		proxySrv, err = server4.NewServer(s.cfg.Interface, &net.UDPAddr{Port: pxePort}, s.handleProxyRequest)
		if err != nil {
			httpL.Close()
			tlsL.Close()
			dhcpSrv.Close()
			return fmt.Errorf("boot service proxydhcp on %s port %d: %w", s.cfg.Interface, pxePort, err)
		}
	}
	// Anyone on the boot network reaches these: bounded connections, no
	// idle or slow ones kept (the image download may take a while).
	hs := &http.Server{Handler: s.bootHandler(), ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 30 * time.Second}
	ts := &http.Server{Handler: s.tlsHandler(), ReadHeaderTimeout: 10 * time.Second, ReadTimeout: 20 * time.Second,
		WriteTimeout: 20 * time.Second, IdleTimeout: 30 * time.Second, TLSConfig: s.tlsConfig}
	httpL, tlsL = netutil.LimitListener(httpL, 256), netutil.LimitListener(tlsL, 64)
	var wg sync.WaitGroup
	wg.Add(4)
	served := func(what string, err error) {
		if err != nil && !errors.Is(err, http.ErrServerClosed) && ctx.Err() == nil {
			s.log.Error("boot service: "+what+" stopped", "err", err)
		}
	}
	go func() { defer wg.Done(); served("http", hs.Serve(httpL)) }()
	go func() { defer wg.Done(); served("tls", ts.ServeTLS(tlsL, "", "")) }()
	go func() { defer wg.Done(); served("dhcp", dhcpSrv.Serve()) }()
	go func() { defer wg.Done(); s.advertise(ctx) }()
	if proxySrv != nil {
		wg.Add(1)
		go func() { defer wg.Done(); served("proxydhcp", proxySrv.Serve()) }()
		s.log.Info("boot service up (proxydhcp: the network's dhcp server gives the addresses)", "address", s.ip,
			"http_port", s.cfg.HTTPPort, "tls", s.tlsAddr)
	} else {
		s.log.Info("boot service up", "address", s.ip, "range", s.cfg.First.String()+"-"+s.cfg.Last.String(),
			"http_port", s.cfg.HTTPPort, "tls", s.tlsAddr)
	}
	<-ctx.Done()
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	hs.Shutdown(sctx)
	ts.Shutdown(sctx)
	hs.Close() // downloads still running after the grace period
	ts.Close()
	dhcpSrv.Close()
	if proxySrv != nil {
		proxySrv.Close()
	}
	wg.Wait()
	return nil
}

// skip tells which addresses of the range are never given: the boot
// service's own, the subnet's network and broadcast addresses.
func (s *Server) skip(ip netip.Addr) bool {
	b := s.prefix.Addr().As4()
	host := uint32(1)<<(32-s.prefix.Bits()) - 1
	base := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
	v := ip.As4()
	u := uint32(v[0])<<24 | uint32(v[1])<<16 | uint32(v[2])<<8 | uint32(v[3])
	return ip == s.ip || u == base || u == base|host
}

func (s *Server) handleDHCP(conn net.PacketConn, peer net.Addr, req *dhcpv4.DHCPv4) {
	// Cheap checks first: only discover and request from an Ethernet
	// client of a kind this service serves go further.
	if req.OpCode != dhcpv4.OpcodeBootRequest || len(req.ClientHWAddr) != 6 {
		return
	}
	if t := req.MessageType(); t != dhcpv4.MessageTypeDiscover && t != dhcpv4.MessageTypeRequest {
		return
	}
	kind := clientKind(req)
	if kind == "" {
		return
	}
	mac := req.ClientHWAddr.String()
	if kind == "pxe" {
		s.log.Warn("boot: a PXE client that is not iPXE: it needs iPXE firmware (no TFTP here)", "mac", mac)
		return
	}
	// A bounded number at once: a flood of requests is dropped (a real
	// client asks again), not turned into a flood of etcd transactions.
	select {
	case s.dhcpSlots <- struct{}{}:
		defer func() { <-s.dhcpSlots }()
	default:
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if s.cfg.ProxyDHCP {
		s.proxyDHCP(ctx, conn, req, kind, mac)
		return
	}
	ip, err := s.reg.leaseFor(ctx, mac, s.cfg.First, s.cfg.Last, s.skip)
	if err != nil {
		s.log.Error("boot: no address for machine", "mac", mac, "err", err)
		return
	}
	bootfile := ""
	if kind == "ipxe" {
		bootfile = fmt.Sprintf(s.dhcp.Bootfile, mac)
	}
	if req.MessageType() == dhcpv4.MessageTypeDiscover {
		s.stageDHCP(ctx, mac, kind)
	}
	resp := answer(req, s.dhcp, ip, bootfile)
	if resp == nil {
		return
	}
	// A client with no address yet hears only broadcasts.
	dst := peer
	if req.ClientIPAddr == nil || req.ClientIPAddr.IsUnspecified() {
		dst = &net.UDPAddr{IP: net.IPv4bcast, Port: dhcpv4.ClientPort}
	}
	if _, err := conn.WriteTo(resp.ToBytes(), dst); err != nil {
		s.log.Warn("boot: dhcp answer not sent", "mac", mac, "err", err)
		return
	}
	s.log.Debug("boot: dhcp", "mac", mac, "client", kind, "request", req.MessageType().String(), "reply", resp.MessageType().String(), "ip", ip)
}

// stageDHCP records a DHCPDISCOVER in the machine's boot timeline: from
// iPXE a new boot, from the booted host its system being up.
func (s *Server) stageDHCP(ctx context.Context, mac, kind string) {
	s.reg.stage(ctx, mac, func(b *api.BootStages, now time.Time) {
		if kind == "ipxe" {
			if b.DHCP.IsZero() || !b.Script.IsZero() {
				*b = api.BootStages{DHCP: now} // a new boot (not iPXE asking again)
			}
		} else if b.HostUp.IsZero() {
			b.HostUp = now
		}
	})
}

// pxePort is where PXE clients send ProxyDHCP requests.
const pxePort = 4011

// proxyDHCP answers a DHCP request in ProxyDHCP mode: an iPXE discover
// gets where to boot from; the booted host's requests, and every
// request for an address, are the network's own server's to answer.
func (s *Server) proxyDHCP(ctx context.Context, conn net.PacketConn, req *dhcpv4.DHCPv4, kind, mac string) {
	if req.MessageType() != dhcpv4.MessageTypeDiscover {
		return
	}
	// The offer first, the timeline after: iPXE waits only a moment for
	// ProxyDHCP offers, and a slow store must not make it boot without.
	if kind == "ipxe" {
		if resp := proxyAnswer(req, s.dhcp, fmt.Sprintf(s.dhcp.Bootfile, mac), false); resp != nil {
			if _, err := conn.WriteTo(resp.ToBytes(), &net.UDPAddr{IP: net.IPv4bcast, Port: dhcpv4.ClientPort}); err != nil {
				s.log.Warn("boot: proxydhcp offer not sent", "mac", mac, "err", err)
			} else {
				s.log.Debug("boot: proxydhcp offer", "mac", mac)
			}
		}
	}
	s.stageDHCP(ctx, mac, kind)
}

// handleProxyRequest answers an iPXE client's ProxyDHCP request on port
// 4011 (it has its address from the network's server by then).
func (s *Server) handleProxyRequest(conn net.PacketConn, peer net.Addr, req *dhcpv4.DHCPv4) {
	if req.OpCode != dhcpv4.OpcodeBootRequest || len(req.ClientHWAddr) != 6 || clientKind(req) != "ipxe" {
		return
	}
	mac := req.ClientHWAddr.String()
	resp := proxyAnswer(req, s.dhcp, fmt.Sprintf(s.dhcp.Bootfile, mac), true)
	if resp == nil {
		return
	}
	if _, err := conn.WriteTo(resp.ToBytes(), peer); err != nil {
		s.log.Warn("boot: proxydhcp ack not sent", "mac", mac, "err", err)
		return
	}
	s.log.Debug("boot: proxydhcp ack", "mac", mac, "peer", peer)
}
