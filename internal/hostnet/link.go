package hostnet

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// linkByName finds an interface; ok is false if there is none.
func linkByName(name string) (netlink.Link, bool, error) {
	l, err := netlink.LinkByName(name)
	if err == nil {
		return l, true, nil
	}
	var nf netlink.LinkNotFoundError
	if errors.As(err, &nf) {
		return nil, false, nil
	}
	return nil, false, fmt.Errorf("look up interface %s: %w", name, err)
}

// ensureBridge makes (or adopts) the bridge of a managed network: up, with
// the gateway's address and MAC.
func ensureBridge(name string, mac net.HardwareAddr, gateway netip.Prefix) (netlink.Link, error) {
	l, ok, err := linkByName(name)
	if err != nil {
		return nil, err
	}
	if !ok {
		attrs := netlink.NewLinkAttrs()
		attrs.Name = name
		attrs.HardwareAddr = mac
		if err := netlink.LinkAdd(&netlink.Bridge{LinkAttrs: attrs}); err != nil && !errors.Is(err, unix.EEXIST) {
			return nil, fmt.Errorf("create bridge %s: %w", name, err)
		}
		if l, err = netlink.LinkByName(name); err != nil {
			return nil, fmt.Errorf("create bridge %s: %w", name, err)
		}
	}
	if _, isBridge := l.(*netlink.Bridge); !isBridge {
		return nil, fmt.Errorf("interface %s exists and is a %s, not a bridge: remove it", name, l.Type())
	}
	if l.Attrs().HardwareAddr.String() != mac.String() {
		if err := netlink.LinkSetHardwareAddr(l, mac); err != nil {
			return nil, fmt.Errorf("set the MAC of bridge %s: %w", name, err)
		}
	}
	if gateway.IsValid() {
		addr := &netlink.Addr{IPNet: &net.IPNet{IP: gateway.Addr().AsSlice(), Mask: net.CIDRMask(gateway.Bits(), 32)}}
		if err := netlink.AddrReplace(l, addr); err != nil {
			return nil, fmt.Errorf("give bridge %s the gateway address %s: %w", name, gateway, err)
		}
	}
	if err := netlink.LinkSetUp(l); err != nil {
		return nil, fmt.Errorf("bring bridge %s up: %w", name, err)
	}
	return l, nil
}

// existingBridge finds a bridge the operator runs.
func existingBridge(name string) (netlink.Link, error) {
	l, ok, err := linkByName(name)
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, fmt.Errorf("%w: bridge %s does not exist on this host: create it (for example with systemd-networkd or ifupdown) or use a managed network", ErrNoBridge, name)
	}
	if _, isBridge := l.(*netlink.Bridge); !isBridge {
		return nil, fmt.Errorf("%w: interface %s is a %s, not a bridge", ErrNoBridge, name, l.Type())
	}
	return l, nil
}

// ErrNoBridge means a network names a bridge this host lacks.
var ErrNoBridge = errors.New("no such bridge")

// deleteLink removes an interface if it exists.
func deleteLink(name string) error {
	l, ok, err := linkByName(name)
	if err != nil || !ok {
		return err
	}
	if err := netlink.LinkDel(l); err != nil && !errors.Is(err, unix.ENODEV) {
		return fmt.Errorf("delete interface %s: %w", name, err)
	}
	return nil
}

// ensureTap makes a persistent tap enslaved to bridge, for QEMU to open by
// name (-netdev tap,ifname=...). One already on the bridge is kept (the
// QEMU of an adopted VM holds it); anything else of that name is replaced.
func ensureTap(name string, bridge netlink.Link) error {
	l, ok, err := linkByName(name)
	if err != nil {
		return err
	}
	if ok {
		// A running QEMU holds it (the agent restarted): keep it if it is
		// where it belongs.
		if _, isTap := l.(*netlink.Tuntap); isTap && l.Attrs().MasterIndex == bridge.Attrs().Index {
			return netlink.LinkSetUp(l)
		}
		if err := netlink.LinkDel(l); err != nil {
			return fmt.Errorf("replace interface %s: %w", name, err)
		}
	}
	attrs := netlink.NewLinkAttrs()
	attrs.Name = name
	// QEMU asks for a vnet header; a tap made without one refuses it.
	tap := &netlink.Tuntap{LinkAttrs: attrs, Mode: netlink.TUNTAP_MODE_TAP,
		Flags: netlink.TUNTAP_NO_PI | netlink.TUNTAP_VNET_HDR | netlink.TUNTAP_ONE_QUEUE}
	if err := netlink.LinkAdd(tap); err != nil {
		return fmt.Errorf("create tap %s: %w", name, err)
	}
	l, err = netlink.LinkByName(name)
	if err != nil {
		return fmt.Errorf("create tap %s: %w", name, err)
	}
	if err := netlink.LinkSetMaster(l, bridge); err != nil {
		_ = netlink.LinkDel(l)
		return fmt.Errorf("attach tap %s to bridge %s: %w", name, bridge.Attrs().Name, err)
	}
	if err := netlink.LinkSetUp(l); err != nil {
		_ = netlink.LinkDel(l)
		return fmt.Errorf("bring tap %s up: %w", name, err)
	}
	return nil
}

// ensureVXLAN joins a managed network's bridge to the other hosts: one
// VXLAN device (id vni, UDP 4789 from local) with a flooding entry per
// peer (head-end replication: no multicast needed in the underlay).
func ensureVXLAN(name string, vni int, local netip.Addr, peers []netip.Addr, bridge netlink.Link) error {
	l, ok, err := linkByName(name)
	if err != nil {
		return err
	}
	if ok {
		v, isVX := l.(*netlink.Vxlan)
		if !isVX || v.VxlanId != vni || !v.SrcAddr.Equal(local.AsSlice()) {
			if err := netlink.LinkDel(l); err != nil {
				return fmt.Errorf("replace interface %s: %w", name, err)
			}
			ok = false
		}
	}
	if !ok {
		attrs := netlink.NewLinkAttrs()
		attrs.Name = name
		attrs.MTU = 1450 // 1500 less VXLAN's 50 bytes
		vx := &netlink.Vxlan{LinkAttrs: attrs, VxlanId: vni, SrcAddr: local.AsSlice(), Port: 4789, Learning: true}
		if err := netlink.LinkAdd(vx); err != nil {
			return fmt.Errorf("create VXLAN %s (id %d): %w", name, vni, err)
		}
		if l, err = netlink.LinkByName(name); err != nil {
			return fmt.Errorf("create VXLAN %s: %w", name, err)
		}
	}
	if err := netlink.LinkSetMaster(l, bridge); err != nil {
		return fmt.Errorf("attach VXLAN %s to bridge %s: %w", name, bridge.Attrs().Name, err)
	}
	want := map[string]bool{}
	for _, p := range peers {
		want[p.String()] = true
	}
	have, err := netlink.NeighList(l.Attrs().Index, unix.AF_BRIDGE)
	if err != nil {
		return fmt.Errorf("list the peers of %s: %w", name, err)
	}
	zero := net.HardwareAddr{0, 0, 0, 0, 0, 0}
	for _, n := range have {
		if n.HardwareAddr.String() != zero.String() {
			continue // learnt entries
		}
		if want[n.IP.String()] {
			delete(want, n.IP.String())
			continue
		}
		if err := netlink.NeighDel(&n); err != nil {
			return fmt.Errorf("forget peer %s of %s: %w", n.IP, name, err)
		}
	}
	for p := range want {
		n := &netlink.Neigh{LinkIndex: l.Attrs().Index, Family: unix.AF_BRIDGE, State: netlink.NUD_PERMANENT,
			Flags: netlink.NTF_SELF, IP: net.ParseIP(p), HardwareAddr: zero}
		if err := netlink.NeighAppend(n); err != nil {
			return fmt.Errorf("add peer %s to %s: %w", p, name, err)
		}
	}
	if err := netlink.LinkSetUp(l); err != nil {
		return fmt.Errorf("bring VXLAN %s up: %w", name, err)
	}
	return nil
}

// setSysctl writes a sysctl of this network namespace.
func setSysctl(path, value string) error {
	if err := os.WriteFile("/proc/sys/"+path, []byte(value), 0o644); err != nil {
		return fmt.Errorf("set %s: %w", path, err)
	}
	return nil
}

// hasVhostNet says whether QEMU can use in-kernel virtio-net (vhost-net).
func hasVhostNet() bool {
	f, err := os.OpenFile("/dev/vhost-net", os.O_RDWR, 0)
	if err != nil {
		return false
	}
	f.Close()
	return true
}
