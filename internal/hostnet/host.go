package hostnet

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
)

// Network is a network as one host sees it.
type Network struct {
	Name string
	// Bridge is the operator's bridge to attach VMs to; empty for a
	// network Vigil manages (its own bridge, DHCP, gateway and VXLAN).
	Bridge  string
	Subnet  netip.Prefix
	Gateway netip.Addr
	NAT     bool
	DNS     []netip.Addr
	// VNI, Local and Peers join the bridge to the other hosts over VXLAN
	// (Local: this host's underlay address; Peers: the other hosts' that
	// are on other machines). No peers: no VXLAN device.
	VNI   int
	Local netip.Addr
	Peers []netip.Addr
}

func (n Network) equal(o Network) bool {
	return n.Name == o.Name && n.Bridge == o.Bridge && n.Subnet == o.Subnet && n.Gateway == o.Gateway && n.NAT == o.NAT &&
		n.VNI == o.VNI && n.Local == o.Local && slices.Equal(n.DNS, o.DNS) && slices.Equal(n.Peers, o.Peers)
}

// Managed says whether Vigil runs the network's bridge.
func (n Network) Managed() bool { return n.Bridge == "" }

// NIC is a VM's network card as the host wires it.
type NIC struct {
	VM       string
	Index    int
	Network  string
	MAC      net.HardwareAddr
	IP       netip.Addr // zero on an operator's bridge without a fixed address
	Hostname string
	Publish  []Publish
}

// Publish forwards a port of the host to the VM.
type Publish struct {
	Proto     string // tcp (default) or udp
	HostPort  uint16
	GuestPort uint16
}

// Host wires one host agent's VMs to their networks.
type Host struct {
	name  string
	table string
	log   *slog.Logger

	mu   sync.Mutex
	nets map[string]*netState
	nics map[string]NIC // by tap
}

type netState struct {
	spec   Network
	bridge netlink.Link
	dhcp   *dhcpServer
	probe  *prober
}

// New is the network side of host agent name.
func New(log *slog.Logger, name string) *Host {
	return &Host{name: name, table: "vigil_" + sanitize(name), log: log.With("component", "hostnet"),
		nets: map[string]*netState{}, nics: map[string]NIC{}}
}

func sanitize(s string) string {
	return strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '_' {
			return r
		}
		return '_'
	}, strings.ToLower(s))
}

// BridgeOf is the bridge a network's VMs attach to on this host.
func (n Network) BridgeOf() string {
	if n.Managed() {
		return BridgeName(n.Name)
	}
	return n.Bridge
}

// Has says whether the network is wired on this host.
func (h *Host) Has(name string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	_, ok := h.nets[name]
	return ok
}

// EnsureNetwork makes the network ready on this host (idempotent: a spec
// that changed, such as new peers, is applied).
func (h *Host) EnsureNetwork(n Network) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.ensureLocked(n)
}

func (h *Host) ensureLocked(n Network) error {
	st := h.nets[n.Name]
	if st == nil {
		st = &netState{}
	} else if st.spec.equal(n) {
		return nil
	}
	var err error
	if n.Managed() {
		gw := netip.PrefixFrom(n.Gateway, n.Subnet.Bits())
		if st.bridge, err = ensureBridge(BridgeName(n.Name), GatewayMAC(n.Name), gw); err != nil {
			return err
		}
		if err := setSysctl("net/ipv4/ip_forward", "1"); err != nil {
			return err
		}
		if n.VNI > 0 && len(n.Peers) > 0 {
			if err := ensureVXLAN(VXLANName(n.Name), n.VNI, n.Local, n.Peers, st.bridge); err != nil {
				return err
			}
		} else if err := deleteLink(VXLANName(n.Name)); err != nil {
			return err
		}
		cfg := dhcpConfig{Prefix: n.Subnet, Gateway: n.Gateway, DNS: n.DNS}
		if st.dhcp == nil {
			if st.dhcp, err = startDHCP(h.log, st.bridge.Attrs().Name, cfg); err != nil {
				return err
			}
		} else {
			st.dhcp.configure(cfg)
		}
	} else if st.bridge, err = existingBridge(n.Bridge); err != nil {
		return err
	}
	if st.probe == nil {
		src := netip.Addr{}
		if n.Managed() {
			src = n.Gateway
		}
		if st.probe, err = startProber(h.log, st.bridge.Attrs().Name, src); err != nil {
			st.stop()
			return err
		}
	}
	st.spec = n
	h.nets[n.Name] = st
	return h.applyLocked()
}

func (st *netState) stop() {
	if st.dhcp != nil {
		st.dhcp.close()
		st.dhcp = nil
	}
	if st.probe != nil {
		st.probe.close()
		st.probe = nil
	}
}

// Plug makes the tap of a VM's NIC on its network (which must have been
// ensured), reserves its address and locks it to its MAC and address. It
// returns the tap's name, for QEMU's -netdev tap,ifname=.
func (h *Host) Plug(nic NIC) (string, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	st := h.nets[nic.Network]
	if st == nil {
		return "", fmt.Errorf("network %s is not set up on host %s", nic.Network, h.name)
	}
	if len(nic.MAC) != 6 {
		return "", fmt.Errorf("NIC %d of %s has no MAC address", nic.Index, nic.VM)
	}
	if st.spec.Managed() && !nic.IP.IsValid() {
		return "", fmt.Errorf("NIC %d of %s has no address on managed network %s", nic.Index, nic.VM, nic.Network)
	}
	tap := TapName(h.name, nic.VM, nic.Index)
	for t, other := range h.nics {
		if t != tap && other.Network == nic.Network && (other.MAC.String() == nic.MAC.String() || nic.IP.IsValid() && other.IP == nic.IP) {
			return "", fmt.Errorf("NIC %d of %s: %s (%s) is already used by %s on this host", nic.Index, nic.VM, nic.MAC, nic.IP, other.VM)
		}
	}
	if err := ensureTap(tap, st.bridge); err != nil {
		return "", err
	}
	h.nics[tap] = nic
	if err := h.applyLocked(); err != nil {
		delete(h.nics, tap)
		_ = deleteLink(tap)
		return "", err
	}
	if st.dhcp != nil {
		st.dhcp.reserve(nic.MAC, lease{IP: nic.IP, Hostname: nic.Hostname})
	}
	if nic.IP.IsValid() {
		st.probe.watch(nic.IP, nic.MAC)
	}
	return tap, nil
}

// Unplug removes a NIC's tap, reservation and rules.
func (h *Host) Unplug(tap string) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	nic, ok := h.nics[tap]
	if !ok {
		return deleteLink(tap)
	}
	if st := h.nets[nic.Network]; st != nil {
		if st.dhcp != nil {
			st.dhcp.release(nic.MAC)
		}
		if nic.IP.IsValid() {
			st.probe.unwatch(nic.IP)
		}
	}
	delete(h.nics, tap)
	err := deleteLink(tap)
	return errors.Join(err, h.applyLocked())
}

// RemoveNetwork takes a network off this host: refused while a VM of this
// host is on it. Its bridge goes too unless something else is attached to
// it (another host agent on this machine).
func (h *Host) RemoveNetwork(name string) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, nic := range h.nics {
		if nic.Network == name {
			return fmt.Errorf("network %s is in use by %s on host %s", name, nic.VM, h.name)
		}
	}
	st := h.nets[name]
	if st == nil {
		return nil
	}
	st.stop()
	delete(h.nets, name)
	var errs []error
	if st.spec.Managed() {
		errs = append(errs, deleteLink(VXLANName(name)))
		if !bridgeHasPorts(st.bridge) {
			errs = append(errs, deleteLink(st.bridge.Attrs().Name))
		}
	}
	errs = append(errs, h.applyLocked())
	return errors.Join(errs...)
}

func bridgeHasPorts(br netlink.Link) bool {
	links, err := netlink.LinkList()
	if err != nil {
		return true // keep it when in doubt
	}
	for _, l := range links {
		if l.Attrs().MasterIndex == br.Attrs().Index {
			return true
		}
	}
	return false
}

// Answered is when the guest behind tap last answered ARP for its address
// (ok false: the NIC has no address to ask for).
func (h *Host) Answered(tap string) (time.Time, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	nic, ok := h.nics[tap]
	if !ok || !nic.IP.IsValid() {
		return time.Time{}, false
	}
	st := h.nets[nic.Network]
	if st == nil || st.probe == nil {
		return time.Time{}, false
	}
	return st.probe.answered(nic.IP), true
}

// Counters are a tap's traffic, as the host counts it.
type Counters struct {
	RxPackets, TxPackets, RxBytes, TxBytes uint64
}

// TapCounters reads a tap's traffic counters.
func TapCounters(tap string) (Counters, error) {
	l, err := netlink.LinkByName(tap)
	if err != nil {
		return Counters{}, fmt.Errorf("tap %s: %w", tap, err)
	}
	s := l.Attrs().Statistics
	if s == nil {
		return Counters{}, nil
	}
	return Counters{RxPackets: s.RxPackets, TxPackets: s.TxPackets, RxBytes: s.RxBytes, TxBytes: s.TxBytes}, nil
}

// Close stops the host's DHCP servers and probers. Bridges, taps and rules
// stay: the VMs run on without their agent, and a new agent takes them over.
func (h *Host) Close() {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, st := range h.nets {
		st.stop()
	}
	h.nets = map[string]*netState{}
}

// applyLocked rewrites the firewall from the networks and NICs.
func (h *Host) applyLocked() error {
	var rs ruleset
	names := make([]string, 0, len(h.nets))
	for n := range h.nets {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		st := h.nets[n]
		fw := fwNetwork{Bridge: st.spec.BridgeOf(), Managed: st.spec.Managed(), Prefix: st.spec.Subnet, Gateway: st.spec.Gateway, NAT: st.spec.NAT}
		if st.spec.Managed() && st.spec.VNI > 0 && len(st.spec.Peers) > 0 {
			fw.VXLAN = VXLANName(n)
		}
		rs.Networks = append(rs.Networks, fw)
	}
	taps := make([]string, 0, len(h.nics))
	for t := range h.nics {
		taps = append(taps, t)
	}
	sort.Strings(taps)
	for _, t := range taps {
		nic := h.nics[t]
		rs.Ports = append(rs.Ports, fwPort{Tap: t, MAC: nic.MAC, IP: nic.IP})
		for _, p := range nic.Publish {
			if nic.IP.IsValid() {
				rs.Publishes = append(rs.Publishes, fwPublish{Proto: p.Proto, HostPort: p.HostPort, IP: nic.IP, GuestPort: p.GuestPort})
			}
		}
	}
	return applyFirewall(h.table, rs)
}

// VhostNet says whether QEMU can use vhost-net here.
func VhostNet() bool { return hasVhostNet() }
