package bootsvc

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv4"

	"github.com/vigil-project/vigil/internal/store"
)

const leaseTime = time.Hour

// hostVendorClass is what a booted Vigil host's DHCP client says it is
// (the host image's udhcpc -V).
const hostVendorClass = "vigil-host"

// dhcpConfig is what the boot service's DHCP answers with.
type dhcpConfig struct {
	ServerIP netip.Addr
	Prefix   netip.Prefix
	Router   netip.Addr // zero: none
	// Bootfile is the iPXE script URL, with %s for the client's MAC.
	Bootfile string
}

// clientKind sorts DHCP clients: iPXE loading a host, a booted host, or
// someone else (not answered: the boot network may carry other DHCP).
func clientKind(req *dhcpv4.DHCPv4) string {
	if slices.ContainsFunc(req.UserClass(), func(c string) bool { return c == "iPXE" }) {
		return "ipxe"
	}
	vc := req.ClassIdentifier()
	switch {
	case vc == hostVendorClass:
		return "host"
	case strings.HasPrefix(vc, "PXEClient"):
		return "pxe" // a PXE ROM that is not iPXE: it would need TFTP
	}
	return ""
}

// answer is the reply to req for a client leased ip, or nil for none.
func answer(req *dhcpv4.DHCPv4, cfg dhcpConfig, ip netip.Addr, bootfile string) *dhcpv4.DHCPv4 {
	if req.OpCode != dhcpv4.OpcodeBootRequest || len(req.ClientHWAddr) != 6 {
		return nil
	}
	var typ dhcpv4.MessageType
	switch req.MessageType() {
	case dhcpv4.MessageTypeDiscover:
		typ = dhcpv4.MessageTypeOffer
	case dhcpv4.MessageTypeRequest:
		if sid := req.ServerIdentifier(); sid != nil && !sid.IsUnspecified() && !sid.Equal(cfg.ServerIP.AsSlice()) {
			return nil // the client took another server's offer
		}
		want := req.RequestedIPAddress()
		if want == nil || want.IsUnspecified() {
			want = req.ClientIPAddr // renewing
		}
		typ = dhcpv4.MessageTypeAck
		if !want.Equal(ip.AsSlice()) {
			typ = dhcpv4.MessageTypeNak
		}
	default:
		return nil
	}
	mods := []dhcpv4.Modifier{
		dhcpv4.WithMessageType(typ),
		dhcpv4.WithServerIP(cfg.ServerIP.AsSlice()),
		dhcpv4.WithOption(dhcpv4.OptServerIdentifier(cfg.ServerIP.AsSlice())),
	}
	if typ != dhcpv4.MessageTypeNak {
		mask := net.CIDRMask(cfg.Prefix.Bits(), 32)
		mods = append(mods, dhcpv4.WithYourIP(ip.AsSlice()), dhcpv4.WithNetmask(mask),
			dhcpv4.WithLeaseTime(uint32(leaseTime/time.Second)))
		if cfg.Router.IsValid() {
			mods = append(mods, dhcpv4.WithRouter(cfg.Router.AsSlice()))
		}
		if bootfile != "" {
			mods = append(mods, dhcpv4.WithOption(dhcpv4.OptBootFileName(bootfile)))
		}
	}
	resp, err := dhcpv4.NewReplyFromRequest(req, mods...)
	if err != nil {
		return nil
	}
	return resp
}

// leaseRecord is boot/leases/IP: the address belongs to machine MAC.
type leaseRecord struct {
	MAC string `json:"mac"`
}

func leaseKey(ip netip.Addr) string { return "boot/leases/" + ip.String() }

// leaseFor is mac's address in [first, last]: the one it has, else the
// lowest free one. Leases are claimed in etcd, so two boot services never
// give one address to two machines.
func (r *Registry) leaseFor(ctx context.Context, mac string, first, last netip.Addr) (netip.Addr, error) {
	kvs, err := r.Store.List(ctx, "boot/leases/")
	if err != nil {
		return netip.Addr{}, err
	}
	taken := map[netip.Addr]bool{}
	for _, kv := range kvs {
		ip, err := netip.ParseAddr(kv.Key)
		if err != nil {
			continue
		}
		var l leaseRecord
		if json.Unmarshal(kv.Value, &l) == nil && l.MAC == mac && !ip.Less(first) && !last.Less(ip) {
			return ip, nil
		}
		taken[ip] = true
	}
	for ip := first; !last.Less(ip); ip = ip.Next() {
		if taken[ip] {
			continue
		}
		if _, err := r.Store.Create(ctx, leaseKey(ip), leaseRecord{MAC: mac}); errors.Is(err, store.ErrExists) {
			continue // taken since the list
		} else if err != nil {
			return netip.Addr{}, err
		}
		return ip, nil
	}
	return netip.Addr{}, fmt.Errorf("boot address range %s-%s is full: widen --boot-range or remove machines", first, last)
}
