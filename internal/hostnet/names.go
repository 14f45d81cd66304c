// Package hostnet is a host's side of Vigil's networks: a Linux bridge per
// network (with VXLAN to the other hosts), a tap per VM NIC, a DHCP server
// that hands each local VM its reserved address, nftables rules for NAT,
// published ports, anti-spoofing and isolation, and an ARP prober that
// tells whether a guest's kernel still answers. Everything is programmed
// over netlink (vishvananda/netlink, google/nftables): no ip or nft
// commands. The kernel holds the state; a host agent that restarts
// rebuilds it from what the manager gives it.
package hostnet

import (
	"crypto/sha256"
	"encoding/hex"
	"net"
	"strconv"
)

// Interface names are at most 15 bytes. Every name Vigil makes starts with
// "vg" so that rules can match all of them, and carries a hash so that the
// same network gets the same bridge on every boot (and hosts sharing one
// machine share it), while each host's taps stay apart.
const (
	bridgePrefix = "vgb"
	tapPrefix    = "vgt"
	vxlanPrefix  = "vgx"
)

func hash10(parts ...string) string {
	h := sha256.New()
	for _, p := range parts {
		h.Write([]byte(p))
		h.Write([]byte{0})
	}
	return hex.EncodeToString(h.Sum(nil))[:10]
}

// BridgeName is the bridge of managed network name.
func BridgeName(network string) string { return bridgePrefix + hash10("bridge", network) }

// VXLANName is the VXLAN device joining the bridge of network to the other hosts.
func VXLANName(network string) string { return vxlanPrefix + hash10("vxlan", network) }

// TapName is the tap of NIC nic of VM vm on host host.
func TapName(host, vm string, nic int) string {
	return tapPrefix + hash10("tap", host, vm, strconv.Itoa(nic))
}

// GatewayMAC is the bridge's MAC address for network: the same on every
// host, so that a VM that moves keeps a valid ARP entry for its gateway
// (every host answers for the gateway, and only to its own VMs). It is
// locally administered (0x02 bit) and unicast.
func GatewayMAC(network string) net.HardwareAddr {
	h := sha256.Sum256([]byte("gateway\x00" + network))
	return net.HardwareAddr{0x02, 0x56, 0x47, h[0], h[1], h[2]}
}
