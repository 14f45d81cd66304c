package hostnet

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// The firewall is declarative: after every change a host agent rewrites its
// own two tables (named after the host, so that agents sharing a machine
// keep apart) from the whole state, in one netlink transaction, so that the
// kernel never holds half a rule set.
//
//   - bridge <table>: anti-spoofing. A frame from a VM's tap must carry the
//     VM's MAC (as Ethernet source and ARP sender) and, once the VM has an
//     address, its IP (as IPv4 source and ARP sender; 0.0.0.0 stays allowed
//     for DHCP and address probes). Only IPv4, ARP and IPv6 frames pass (no
//     VLAN tags smuggling frames past these checks), and a VM may not act as
//     a DHCP server. The host's own frames never leave through a VXLAN
//     device: each host is the gateway and DHCP server of its own VMs only.
//   - inet <table>: isolation, NAT and published ports. A managed network's
//     bridge may not route to another Vigil network; VMs reach the host
//     itself only for DHCP, a ping of their gateway and connections the
//     host opened; NAT networks are masqueraded out of every other
//     interface; a published port is DNATed to its VM for packets to any of
//     the host's addresses.

// fwNetwork is a network this host has a bridge for.
type fwNetwork struct {
	Bridge  string
	Managed bool         // Vigil's bridge (not the operator's)
	Prefix  netip.Prefix // managed networks
	Gateway netip.Addr
	NAT     bool
	VXLAN   string // the VXLAN device, if any
}

// fwPort is a VM NIC's tap.
type fwPort struct {
	Tap string
	MAC net.HardwareAddr
	IP  netip.Addr // zero: not known (the operator's DHCP)
}

// fwPublish forwards a host port to a VM.
type fwPublish struct {
	Proto     string // tcp or udp
	HostPort  uint16
	IP        netip.Addr
	GuestPort uint16
}

type ruleset struct {
	Networks  []fwNetwork
	Ports     []fwPort
	Publishes []fwPublish
}

func protoNumber(p string) (byte, error) {
	switch p {
	case "tcp", "":
		return unix.IPPROTO_TCP, nil
	case "udp":
		return unix.IPPROTO_UDP, nil
	}
	return 0, fmt.Errorf("protocol %q: want tcp or udp", p)
}

// applyFirewall replaces the host's tables with rs's rules.
func applyFirewall(table string, rs ruleset) error {
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	br := replaceTable(c, nftables.TableFamilyBridge, table)
	in := replaceTable(c, nftables.TableFamilyINet, table)
	if err := bridgeRules(c, br, rs); err != nil {
		return err
	}
	if err := inetRules(c, in, rs); err != nil {
		return err
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("nftables: write table %s: %w", table, err)
	}
	return nil
}

// removeFirewall deletes the host's tables.
func removeFirewall(table string) error {
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	for _, f := range []nftables.TableFamily{nftables.TableFamilyBridge, nftables.TableFamilyINet} {
		t := c.AddTable(&nftables.Table{Family: f, Name: table})
		c.DelTable(t)
	}
	if err := c.Flush(); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("nftables: delete table %s: %w", table, err)
	}
	return nil
}

// replaceTable queues: make the table (a no-op if it exists), delete it
// with everything in it, make it afresh.
func replaceTable(c *nftables.Conn, f nftables.TableFamily, name string) *nftables.Table {
	t := &nftables.Table{Family: f, Name: name}
	c.AddTable(t)
	c.DelTable(t)
	return c.AddTable(t)
}

func baseChain(c *nftables.Conn, t *nftables.Table, name string, typ nftables.ChainType, hook *nftables.ChainHook, prio *nftables.ChainPriority) *nftables.Chain {
	policy := nftables.ChainPolicyAccept
	return c.AddChain(&nftables.Chain{Name: name, Table: t, Type: typ, Hooknum: hook, Priority: prio, Policy: &policy})
}

func bridgeRules(c *nftables.Conn, t *nftables.Table, rs ruleset) error {
	pre := baseChain(c, t, "prerouting", nftables.ChainTypeFilter, nftables.ChainHookPrerouting, nftables.ChainPriorityRef(-200))
	add := func(ch *nftables.Chain, e []expr.Any) { c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: e}) }
	zero := netip.IPv4Unspecified()
	for _, p := range rs.Ports {
		tap := iif(p.Tap)
		add(pre, rule(tap, etherSaddr(expr.CmpOpNeq, p.MAC), counter(), drop))
		add(pre, rule(tap, etherType(expr.CmpOpEq, etherTypeARP), arpSenderMAC(expr.CmpOpNeq, p.MAC), counter(), drop))
		if p.IP.IsValid() {
			add(pre, rule(tap, etherType(expr.CmpOpEq, etherTypeARP), arpSenderIP(expr.CmpOpNeq, p.IP), arpSenderIP(expr.CmpOpNeq, zero), counter(), drop))
			add(pre, rule(tap, etherType(expr.CmpOpEq, etherTypeIPv4), ipSaddr(expr.CmpOpNeq, p.IP), ipSaddr(expr.CmpOpNeq, zero), counter(), drop))
		}
		add(pre, rule(tap, etherType(expr.CmpOpEq, etherTypeIPv4), l4proto(unix.IPPROTO_UDP), sport(67), counter(), drop))
		for _, et := range []uint16{etherTypeIPv4, etherTypeARP, etherTypeIPv6} {
			add(pre, rule(tap, etherType(expr.CmpOpEq, et), accept))
		}
		add(pre, rule(tap, counter(), drop))
	}
	out := baseChain(c, t, "output", nftables.ChainTypeFilter, nftables.ChainHookOutput, nftables.ChainPriorityRef(-200))
	for _, n := range rs.Networks {
		if n.VXLAN != "" {
			add(out, rule(oif(n.VXLAN), drop))
		}
	}
	return nil
}

func inetRules(c *nftables.Conn, t *nftables.Table, rs ruleset) error {
	add := func(ch *nftables.Chain, e []expr.Any) { c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: e}) }
	input := baseChain(c, t, "input", nftables.ChainTypeFilter, nftables.ChainHookInput, nftables.ChainPriorityFilter)
	forward := baseChain(c, t, "forward", nftables.ChainTypeFilter, nftables.ChainHookForward, nftables.ChainPriorityFilter)
	post := baseChain(c, t, "postrouting", nftables.ChainTypeNAT, nftables.ChainHookPostrouting, nftables.ChainPriorityNATSource)
	pre := baseChain(c, t, "prerouting", nftables.ChainTypeNAT, nftables.ChainHookPrerouting, nftables.ChainPriorityNATDest)
	output := baseChain(c, t, "output", nftables.ChainTypeNAT, nftables.ChainHookOutput, nftables.ChainPriorityNATDest)
	for _, n := range rs.Networks {
		if !n.Managed {
			continue // the operator's bridge carries the host's own traffic too
		}
		b := iif(n.Bridge)
		add(input, rule(b, ctEstablished(), accept))
		add(input, rule(b, l4proto(unix.IPPROTO_UDP), dport(67), accept))
		add(input, rule(b, ipv4(), ipDaddr(n.Gateway), l4proto(unix.IPPROTO_ICMP), accept))
		add(input, rule(b, counter(), drop))
		add(forward, rule(b, oifPrefix(bridgePrefix), oifNot(n.Bridge), counter(), drop))
		if n.NAT {
			add(post, rule(ipv4(), ipSaddrIn(n.Prefix), oifNot(n.Bridge), match{&expr.Masq{}}))
		}
	}
	for _, p := range rs.Publishes {
		proto, err := protoNumber(p.Proto)
		if err != nil {
			return err
		}
		add(pre, rule(ipv4(), daddrLocal(), l4proto(proto), dport(p.HostPort), dnatTo(p.IP, p.GuestPort)))
		add(output, rule(ipv4(), daddrLocal(), daddrNotLoopback(), l4proto(proto), dport(p.HostPort), dnatTo(p.IP, p.GuestPort)))
	}
	return nil
}
