package bootsvc

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
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

// iPXE's own options (175, encapsulated). no-pxedhcp (176) = 1 tells it
// this answer is the whole story: without it iPXE keeps listening for
// ProxyDHCP offers until its second discovery timeout, about 3 s of every
// boot (measured: DHCP to script 3.1 s with, see docs/benchmarks.md).
const optIPXEEncap = dhcpv4.GenericOptionCode(175)

var ipxeNoProxyDHCP = []byte{176, 1, 1}

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
			mods = append(mods, dhcpv4.WithOption(dhcpv4.OptBootFileName(bootfile)),
				dhcpv4.WithOption(dhcpv4.OptGeneric(optIPXEEncap, ipxeNoProxyDHCP)))
		}
	}
	resp, err := dhcpv4.NewReplyFromRequest(req, mods...)
	if err != nil {
		return nil
	}
	return resp
}

// proxyAnswer is the ProxyDHCP reply to req from an iPXE client, for a
// network whose own DHCP server gives the addresses: no address, only
// where to boot from. A DHCPDISCOVER (port 67) gets an offer, a request
// to port 4011 (what older iPXE sends after taking the real server's
// address) an ack; anything else nil.
func proxyAnswer(req *dhcpv4.DHCPv4, cfg dhcpConfig, bootfile string, port4011 bool) *dhcpv4.DHCPv4 {
	if req.OpCode != dhcpv4.OpcodeBootRequest || len(req.ClientHWAddr) != 6 || bootfile == "" {
		return nil
	}
	var typ dhcpv4.MessageType
	switch {
	case !port4011 && req.MessageType() == dhcpv4.MessageTypeDiscover:
		typ = dhcpv4.MessageTypeOffer
	case port4011 && req.MessageType() == dhcpv4.MessageTypeRequest:
		typ = dhcpv4.MessageTypeAck
	default:
		return nil
	}
	resp, err := dhcpv4.NewReplyFromRequest(req,
		dhcpv4.WithMessageType(typ),
		dhcpv4.WithServerIP(cfg.ServerIP.AsSlice()),
		dhcpv4.WithYourIP(net.IPv4zero),
		dhcpv4.WithOption(dhcpv4.OptServerIdentifier(cfg.ServerIP.AsSlice())),
		// "PXEClient" marks a ProxyDHCP answer to a PXE client.
		dhcpv4.WithOption(dhcpv4.OptClassIdentifier("PXEClient")),
		dhcpv4.WithOption(dhcpv4.OptBootFileName(bootfile)))
	if err != nil {
		return nil
	}
	return resp
}

// leaseRecord is boot/leases/IP: the address is machine MAC's until
// Expires (renewed at every answer); boot/leasemac/MAC names it back.
type leaseRecord struct {
	MAC     string    `json:"mac"`
	Expires time.Time `json:"expires"`
}

type leaseIndex struct {
	IP string `json:"ip"`
}

func leaseKey(ip netip.Addr) string { return "boot/leases/" + ip.String() }
func leaseMACKey(mac string) string { return "boot/leasemac/" + mac }

// leaseFor is mac's address in [first, last] (never one skip refuses):
// the one it has, renewed, else the lowest one free or expired. A lease and
// its index are written in one transaction, so two boot services answering
// the same request agree on one address and leak none; leases that are
// not renewed expire, so made-up clients cannot use up the range for good.
func (r *Registry) leaseFor(ctx context.Context, mac string, first, last netip.Addr, skip func(netip.Addr) bool) (netip.Addr, error) {
	// Each conflict means another lease was just taken: with n machines
	// asking at once, the last may need n attempts.
	for attempt := 0; attempt < 64; attempt++ {
		if attempt > 0 {
			time.Sleep(time.Duration(1+rand.IntN(4)) * time.Millisecond)
		}
		now := r.now()
		var idx leaseIndex
		irev, err := r.Store.Get(ctx, leaseMACKey(mac), &idx)
		if err != nil && !errors.Is(err, store.ErrNotFound) {
			return netip.Addr{}, err
		}
		if ip, perr := netip.ParseAddr(idx.IP); err == nil && perr == nil && !ip.Less(first) && !last.Less(ip) && !skip(ip) {
			var l leaseRecord
			lrev, lerr := r.Store.Get(ctx, leaseKey(ip), &l)
			if lerr == nil && l.MAC == mac {
				if _, err := r.Store.Update(ctx, leaseKey(ip), lrev, leaseRecord{MAC: mac, Expires: now.Add(leaseTime)}); errors.Is(err, store.ErrConflict) {
					continue
				} else if err != nil {
					return netip.Addr{}, err
				}
				return ip, nil
			}
		}
		// No lease (or a stale index): take the lowest address free or
		// expired, with the index, in one transaction.
		kvs, err := r.Store.List(ctx, "boot/leases/")
		if err != nil {
			return netip.Addr{}, err
		}
		held := map[netip.Addr]struct {
			rev     int64
			expired bool
		}{}
		for _, kv := range kvs {
			ip, err := netip.ParseAddr(kv.Key)
			if err != nil {
				continue
			}
			var l leaseRecord
			exp := json.Unmarshal(kv.Value, &l) != nil || now.After(l.Expires)
			held[ip] = struct {
				rev     int64
				expired bool
			}{kv.Revision, exp}
		}
		conflict := false
		for ip := first; !last.Less(ip); ip = ip.Next() {
			h, taken := held[ip]
			if skip(ip) || (taken && !h.expired) {
				continue
			}
			err := r.Store.PutPair(ctx, leaseKey(ip), h.rev, leaseRecord{MAC: mac, Expires: now.Add(leaseTime)},
				leaseMACKey(mac), irev, leaseIndex{IP: ip.String()})
			if errors.Is(err, store.ErrConflict) {
				conflict = true
				break // someone was quicker: look again
			}
			if err != nil {
				return netip.Addr{}, err
			}
			return ip, nil
		}
		if !conflict {
			return netip.Addr{}, fmt.Errorf("boot address range %s-%s is full: widen --boot-range, or forget machines ('vigil boot forget MAC')", first, last)
		}
	}
	return netip.Addr{}, errors.New("boot address: too much contention, try again")
}

// forgetLease drops mac's lease and its index.
func (r *Registry) forgetLease(ctx context.Context, mac string) error {
	var idx leaseIndex
	if _, err := r.Store.Get(ctx, leaseMACKey(mac), &idx); err == nil {
		if ip, err := netip.ParseAddr(idx.IP); err == nil {
			var l leaseRecord
			if _, err := r.Store.Get(ctx, leaseKey(ip), &l); err == nil && l.MAC == mac {
				r.Store.Delete(ctx, leaseKey(ip))
			}
		}
	}
	return r.Store.Delete(ctx, leaseMACKey(mac))
}
