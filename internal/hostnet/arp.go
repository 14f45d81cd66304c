package hostnet

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/mdlayher/arp"
	"github.com/mdlayher/ethernet"
	"github.com/mdlayher/packet"
	"golang.org/x/sys/unix"
)

// probeEvery is how often each VM's address is asked for.
const probeEvery = time.Second

// prober asks, every second on a bridge, who has each local VM's address,
// and remembers when the VM's own MAC last answered. ARP is answered by
// the guest's kernel, not by any process in it: a guest whose agent froze
// still answers, a guest whose kernel hung does not.
type prober struct {
	log  *slog.Logger
	conn *packet.Conn
	mac  net.HardwareAddr
	src  netip.Addr // the gateway, or 0.0.0.0 on an operator's bridge (an RFC 5227 probe)
	stop chan struct{}
	done sync.WaitGroup

	mu      sync.Mutex
	targets map[netip.Addr]*target
}

type target struct {
	mac      net.HardwareAddr
	answered time.Time
}

func startProber(log *slog.Logger, bridge string, src netip.Addr) (*prober, error) {
	ifi, err := net.InterfaceByName(bridge)
	if err != nil {
		return nil, fmt.Errorf("arp probe on %s: %w", bridge, err)
	}
	conn, err := packet.Listen(ifi, packet.Datagram, unix.ETH_P_ARP, nil)
	if err != nil {
		return nil, fmt.Errorf("arp probe on %s: %w", bridge, err)
	}
	if !src.IsValid() {
		src = netip.IPv4Unspecified()
	}
	p := &prober{log: log.With("bridge", bridge), conn: conn, mac: ifi.HardwareAddr, src: src,
		stop: make(chan struct{}), targets: map[netip.Addr]*target{}}
	p.done.Add(2)
	go p.read()
	go p.ask()
	return p, nil
}

func (p *prober) close() {
	close(p.stop)
	_ = p.conn.Close()
	p.done.Wait()
}

func (p *prober) watch(ip netip.Addr, mac net.HardwareAddr) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if t, ok := p.targets[ip]; ok && t.mac.String() == mac.String() {
		return
	}
	p.targets[ip] = &target{mac: mac}
}

func (p *prober) unwatch(ip netip.Addr) {
	p.mu.Lock()
	delete(p.targets, ip)
	p.mu.Unlock()
}

// answered is when ip last answered from its VM's MAC (zero: never).
func (p *prober) answered(ip netip.Addr) time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	if t, ok := p.targets[ip]; ok {
		return t.answered
	}
	return time.Time{}
}

func (p *prober) ask() {
	defer p.done.Done()
	tick := time.NewTicker(probeEvery)
	defer tick.Stop()
	for {
		p.mu.Lock()
		ips := make([]netip.Addr, 0, len(p.targets))
		for ip := range p.targets {
			ips = append(ips, ip)
		}
		p.mu.Unlock()
		for _, ip := range ips {
			req, err := arp.NewPacket(arp.OperationRequest, p.mac, p.src, ethernet.Broadcast, ip)
			if err != nil {
				continue
			}
			b, err := req.MarshalBinary()
			if err != nil {
				continue
			}
			if _, err := p.conn.WriteTo(b, &packet.Addr{HardwareAddr: ethernet.Broadcast}); err != nil && !errors.Is(err, net.ErrClosed) {
				p.log.Debug("arp probe not sent", "ip", ip.String(), "err", err)
			}
		}
		select {
		case <-p.stop:
			return
		case <-tick.C:
		}
	}
}

func (p *prober) read() {
	defer p.done.Done()
	buf := make([]byte, 1500)
	for {
		n, _, err := p.conn.ReadFrom(buf)
		if err != nil {
			select {
			case <-p.stop:
				return
			default:
			}
			if errors.Is(err, net.ErrClosed) {
				return
			}
			time.Sleep(100 * time.Millisecond)
			continue
		}
		p.heard(buf[:n], time.Now())
	}
}

// heard records an ARP packet: a reply (or a gratuitous announcement) from
// a watched address and its own MAC counts as an answer.
func (p *prober) heard(b []byte, at time.Time) {
	var pkt arp.Packet
	if err := pkt.UnmarshalBinary(b); err != nil {
		return
	}
	if pkt.Operation != arp.OperationReply && !(pkt.Operation == arp.OperationRequest && pkt.SenderIP == pkt.TargetIP) {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if t, ok := p.targets[pkt.SenderIP]; ok && t.mac.String() == pkt.SenderHardwareAddr.String() {
		t.answered = at
	}
}
