package hostnet

import (
	"encoding/binary"
	"net"
	"net/netip"

	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// Small builders for nftables expressions. Each returns the expressions
// that load a field into register 1 and compare it; a rule is such matches
// one after another (all must hold) and a verdict.

type match = []expr.Any

// ifnameData is an interface name as the kernel compares it: NUL-padded
// to IFNAMSIZ, or, for a prefix match ("vgb*"), the prefix alone.
func ifnameData(name string, prefix bool) []byte {
	if prefix {
		return []byte(name)
	}
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, name)
	return b
}

func ifname(key expr.MetaKey, op expr.CmpOp, name string, prefix bool) match {
	return match{
		&expr.Meta{Key: key, Register: 1},
		&expr.Cmp{Op: op, Register: 1, Data: ifnameData(name, prefix)},
	}
}

func iif(name string) match         { return ifname(expr.MetaKeyIIFNAME, expr.CmpOpEq, name, false) }
func oif(name string) match         { return ifname(expr.MetaKeyOIFNAME, expr.CmpOpEq, name, false) }
func oifNot(name string) match      { return ifname(expr.MetaKeyOIFNAME, expr.CmpOpNeq, name, false) }
func oifPrefix(prefix string) match { return ifname(expr.MetaKeyOIFNAME, expr.CmpOpEq, prefix, true) }
func payload(base expr.PayloadBase, off, n uint32, op expr.CmpOp, data []byte) match {
	return match{
		&expr.Payload{DestRegister: 1, Base: base, Offset: off, Len: n},
		&expr.Cmp{Op: op, Register: 1, Data: data},
	}
}

func be16(v uint16) []byte { b := make([]byte, 2); binary.BigEndian.PutUint16(b, v); return b }

// Ethernet (bridge family).
const (
	etherTypeIPv4 = 0x0800
	etherTypeARP  = 0x0806
	etherTypeIPv6 = 0x86dd
)

func etherSaddr(op expr.CmpOp, mac net.HardwareAddr) match {
	return payload(expr.PayloadBaseLLHeader, 6, 6, op, []byte(mac))
}

func etherType(op expr.CmpOp, t uint16) match {
	return payload(expr.PayloadBaseLLHeader, 12, 2, op, be16(t))
}

// ARP over Ethernet/IPv4: sender hardware address at 8, sender IP at 14.
func arpSenderMAC(op expr.CmpOp, mac net.HardwareAddr) match {
	return payload(expr.PayloadBaseNetworkHeader, 8, 6, op, []byte(mac))
}

func arpSenderIP(op expr.CmpOp, a netip.Addr) match {
	return payload(expr.PayloadBaseNetworkHeader, 14, 4, op, a.AsSlice())
}

// IPv4 header fields.
func ipSaddr(op expr.CmpOp, a netip.Addr) match {
	return payload(expr.PayloadBaseNetworkHeader, 12, 4, op, a.AsSlice())
}

func ipDaddr(a netip.Addr) match {
	return payload(expr.PayloadBaseNetworkHeader, 16, 4, expr.CmpOpEq, a.AsSlice())
}

// ipSaddrIn matches an IPv4 source inside prefix p.
func ipSaddrIn(p netip.Prefix) match {
	mask := net.CIDRMask(p.Bits(), 32)
	return match{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 12, Len: 4},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: mask, Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: p.Masked().Addr().AsSlice()},
	}
}

func ipv4() match { // inet family: only IPv4 packets
	return match{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.NFPROTO_IPV4}},
	}
}

func l4proto(p byte) match {
	return match{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{p}},
	}
}

func dport(port uint16) match {
	return payload(expr.PayloadBaseTransportHeader, 2, 2, expr.CmpOpEq, be16(port))
}

func sport(port uint16) match {
	return payload(expr.PayloadBaseTransportHeader, 0, 2, expr.CmpOpEq, be16(port))
}

// ctEstablished matches packets of connections already accepted.
func ctEstablished() match {
	mask := make([]byte, 4)
	binary.NativeEndian.PutUint32(mask, expr.CtStateBitESTABLISHED|expr.CtStateBitRELATED)
	return match{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: mask, Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: make([]byte, 4)},
	}
}

// daddrLocal matches packets to one of this host's own addresses.
func daddrLocal() match {
	local := make([]byte, 4)
	binary.NativeEndian.PutUint32(local, unix.RTN_LOCAL)
	return match{
		&expr.Fib{Register: 1, FlagDADDR: true, ResultADDRTYPE: true},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: local},
	}
}

func daddrNotLoopback() match {
	return match{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 1},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{127}},
	}
}

func dnatTo(a netip.Addr, port uint16) match {
	return match{
		&expr.Immediate{Register: 1, Data: a.AsSlice()},
		&expr.Immediate{Register: 2, Data: be16(port)},
		&expr.NAT{Type: expr.NATTypeDestNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: 1, RegProtoMin: 2, Specified: true},
	}
}

func counter() match { return match{&expr.Counter{}} }

func verdict(k expr.VerdictKind) match { return match{&expr.Verdict{Kind: k}} }

var (
	drop   = verdict(expr.VerdictDrop)
	accept = verdict(expr.VerdictAccept)
)

func rule(parts ...match) []expr.Any {
	var out []expr.Any
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}
