package bootsvc

import (
	"context"
	"net"
	"time"

	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv6"
)

// advertise sends IPv6 router advertisements with a router lifetime of 0
// on the boot interface ("no router here"), at start, every 4 seconds
// and in answer to solicitations. iPXE otherwise waits about 15 s for
// IPv6 autoconfiguration before it goes on with DHCP's answer.
func (s *Server) advertise(ctx context.Context) {
	ifi, err := net.InterfaceByName(s.cfg.Interface)
	if err != nil {
		return
	}
	c, err := net.ListenPacket("ip6:ipv6-icmp", "::")
	if err != nil {
		s.log.Warn("boot: no IPv6 router advertisements (iPXE will wait for IPv6 autoconfiguration)", "err", err)
		return
	}
	defer c.Close()
	context.AfterFunc(ctx, func() { c.Close() })
	p := ipv6.NewPacketConn(c)
	p.SetMulticastHopLimit(255) // RFC 4861: a router advertisement has hop limit 255
	p.SetHopLimit(255)
	p.SetMulticastInterface(ifi)
	p.SetControlMessage(ipv6.FlagInterface, true)
	var f ipv6.ICMPFilter
	f.SetAll(true)
	f.Accept(ipv6.ICMPTypeRouterSolicitation)
	p.SetICMPFilter(&f)
	p.JoinGroup(ifi, &net.IPAddr{IP: net.ParseIP("ff02::2")})

	ra := raMessage(ifi.HardwareAddr)
	all := &net.IPAddr{IP: net.ParseIP("ff02::1"), Zone: ifi.Name}
	send := func() {
		if _, err := p.WriteTo(ra, nil, all); err != nil && ctx.Err() == nil {
			s.log.Debug("boot: router advertisement not sent", "err", err)
		}
	}
	solicited := make(chan struct{}, 1)
	go func() {
		buf := make([]byte, 1500)
		for {
			_, cm, _, err := p.ReadFrom(buf)
			if err != nil {
				return
			}
			if cm != nil && cm.IfIndex == ifi.Index {
				select {
				case solicited <- struct{}{}:
				default:
				}
			}
		}
	}()
	t := time.NewTicker(4 * time.Second) // RFC 4861's shortest MaxRtrAdvInterval
	defer t.Stop()
	send()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			send()
		case <-solicited:
			send()
		}
	}
}

// raMessage is a router advertisement with router lifetime 0 and the
// source link-layer address option. The kernel fills in the checksum.
func raMessage(mac net.HardwareAddr) []byte {
	body := []byte{
		0, 0, // current hop limit (0: unspecified, hosts keep theirs), flags
		0, 0, // router lifetime 0: not a default router
		0, 0, 0, 0, // reachable time
		0, 0, 0, 0, // retransmit timer
	}
	if len(mac) == 6 {
		body = append(body, 1, 1) // source link-layer address, 8 bytes
		body = append(body, mac...)
	}
	m := icmp.Message{Type: ipv6.ICMPTypeRouterAdvertisement, Code: 0, Body: &icmp.RawBody{Data: body}}
	b, _ := m.Marshal(nil)
	return b
}
