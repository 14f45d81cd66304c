// Package ipam is the address arithmetic of Vigil's managed networks: a
// subnet with its gateway, which addresses a VM may hold, the next free one,
// and stable MAC addresses. It keeps no state: the manager records who
// holds what (in etcd) and asks this package what is allowed.
package ipam

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
)

// ErrInvalid marks input that can never be accepted (as opposed to an
// address that is merely taken).
var ErrInvalid = errors.New("invalid")

// ErrExhausted means every address of a subnet is held.
var ErrExhausted = errors.New("no free address")

// Subnet is an IPv4 network whose addresses Vigil hands out. The gateway
// is the hosts' address on it; the network and broadcast addresses and the
// gateway are never given to a VM.
type Subnet struct {
	Prefix  netip.Prefix
	Gateway netip.Addr
}

// Smallest and largest networks Vigil manages: a /30 has two usable
// addresses (gateway and one VM); a /16 is 65534, as many VMs as any
// single layer-2 segment should carry.
const (
	minBits = 16
	maxBits = 30
)

// ParseSubnet reads "10.80.0.0/24" and an optional gateway ("" means the
// first address of the subnet).
func ParseSubnet(cidr, gateway string) (Subnet, error) {
	p, err := netip.ParsePrefix(strings.TrimSpace(cidr))
	if err != nil {
		return Subnet{}, fmt.Errorf("%w: subnet %q is not an IPv4 prefix such as 10.80.0.0/24", ErrInvalid, cidr)
	}
	if !p.Addr().Is4() {
		return Subnet{}, fmt.Errorf("%w: subnet %s: only IPv4 subnets are managed", ErrInvalid, p)
	}
	if p.Bits() < minBits || p.Bits() > maxBits {
		return Subnet{}, fmt.Errorf("%w: subnet %s: the prefix length must be /%d to /%d", ErrInvalid, p, minBits, maxBits)
	}
	if p.Masked() != p {
		return Subnet{}, fmt.Errorf("%w: subnet %s has host bits set: did you mean %s?", ErrInvalid, p, p.Masked())
	}
	a := p.Addr()
	if a.IsLoopback() || a.IsMulticast() || a.IsLinkLocalUnicast() || a.IsUnspecified() || !a.IsPrivate() && !isCGNAT(a) {
		return Subnet{}, fmt.Errorf("%w: subnet %s: use a private range (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16 or 100.64.0.0/10)", ErrInvalid, p)
	}
	s := Subnet{Prefix: p}
	if strings.TrimSpace(gateway) == "" {
		s.Gateway = p.Addr().Next()
		return s, nil
	}
	g, err := netip.ParseAddr(strings.TrimSpace(gateway))
	if err != nil || !g.Is4() {
		return Subnet{}, fmt.Errorf("%w: gateway %q is not an IPv4 address", ErrInvalid, gateway)
	}
	if !s.host(g) {
		return Subnet{}, fmt.Errorf("%w: gateway %s is not a host address of %s", ErrInvalid, g, p)
	}
	s.Gateway = g
	return s, nil
}

func isCGNAT(a netip.Addr) bool {
	return netip.MustParsePrefix("100.64.0.0/10").Contains(a)
}

// host says whether a is one of the subnet's host addresses (neither the
// network nor the broadcast address).
func (s Subnet) host(a netip.Addr) bool {
	return a.Is4() && s.Prefix.Contains(a) && a != s.Prefix.Addr() && a != s.Broadcast()
}

// Broadcast is the subnet's last address.
func (s Subnet) Broadcast() netip.Addr {
	b := s.Prefix.Addr().As4()
	for i := s.Prefix.Bits(); i < 32; i++ {
		b[i/8] |= 1 << (7 - i%8)
	}
	return netip.AddrFrom4(b)
}

// Mask is the subnet mask (255.255.255.0 for a /24).
func (s Subnet) Mask() net.IPMask { return net.CIDRMask(s.Prefix.Bits(), 32) }

// Overlaps says whether the two subnets share any address.
func (s Subnet) Overlaps(o netip.Prefix) bool { return s.Prefix.Overlaps(o) }

// Size is the number of addresses VMs can hold.
func (s Subnet) Size() int { return 1<<(32-s.Prefix.Bits()) - 3 }

// Check says whether a VM may hold address a.
func (s Subnet) Check(a netip.Addr) error {
	switch {
	case !a.Is4() || !s.Prefix.Contains(a):
		return fmt.Errorf("%w: address %s is outside the network's subnet %s", ErrInvalid, a, s.Prefix)
	case a == s.Prefix.Addr():
		return fmt.Errorf("%w: address %s is the subnet's network address", ErrInvalid, a)
	case a == s.Broadcast():
		return fmt.Errorf("%w: address %s is the subnet's broadcast address", ErrInvalid, a)
	case a == s.Gateway:
		return fmt.Errorf("%w: address %s is the network's gateway", ErrInvalid, a)
	}
	return nil
}

// Next is the lowest address a VM may hold that taken does not report,
// starting after the gateway so that addresses are handed out in order.
func (s Subnet) Next(taken func(netip.Addr) bool) (netip.Addr, error) {
	start := s.Gateway.Next()
	for a := start; s.Prefix.Contains(a); a = a.Next() {
		if s.Check(a) == nil && !taken(a) {
			return a, nil
		}
	}
	for a := s.Prefix.Addr().Next(); a != start; a = a.Next() {
		if s.Check(a) == nil && !taken(a) {
			return a, nil
		}
	}
	return netip.Addr{}, fmt.Errorf("%w in %s: all %d addresses are held (delete a VM or use a larger subnet)", ErrExhausted, s.Prefix, s.Size())
}

// MAC is the stable MAC address of a VM's NIC number nic: QEMU's
// 52:54:00 prefix and three bytes from a hash of the VM's UUID and nic.
// The manager still checks that no other VM holds it (24 bits collide
// after a few thousand VMs) and asks for the next try with attempt.
func MAC(vmUUID string, nic, attempt int) net.HardwareAddr {
	h := sha256.Sum256([]byte(fmt.Sprintf("%s/%d/%d", vmUUID, nic, attempt)))
	return net.HardwareAddr{0x52, 0x54, 0x00, h[0], h[1], h[2]}
}

// ParseMAC reads a MAC address a user chose for a NIC: six bytes, unicast
// and not all zeros.
func ParseMAC(s string) (net.HardwareAddr, error) {
	m, err := net.ParseMAC(strings.TrimSpace(s))
	if err != nil || len(m) != 6 {
		return nil, fmt.Errorf("%w: MAC address %q is not six bytes such as 52:54:00:12:34:56", ErrInvalid, s)
	}
	if m[0]&1 != 0 {
		return nil, fmt.Errorf("%w: MAC address %s is a multicast address (the first byte must be even)", ErrInvalid, m)
	}
	if string(m) == "\x00\x00\x00\x00\x00\x00" {
		return nil, fmt.Errorf("%w: MAC address %s is all zeros", ErrInvalid, m)
	}
	return m, nil
}
