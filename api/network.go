package api

import "time"

// NetworkCreateRequest is the body of POST /v1/networks. Either Subnet (a
// network Vigil manages: its own bridge on every host, joined by VXLAN,
// with DHCP and a gateway on each host) or Bridge (a bridge the operator
// already runs on every host; addresses come from that network's own DHCP
// unless a NIC names one).
type NetworkCreateRequest struct {
	Name    string `json:"name"`
	Subnet  string `json:"subnet,omitempty"`  // e.g. 10.80.0.0/24
	Gateway string `json:"gateway,omitempty"` // default: the subnet's first address
	// NAT masquerades the network's traffic out of each host's uplink.
	NAT    bool   `json:"nat,omitempty"`
	Bridge string `json:"bridge,omitempty"`
	// DNS servers the DHCP server hands out (default: the gateway host's
	// own resolvers when NAT is on, none otherwise).
	DNS []string `json:"dns,omitempty"`
}

// Network is a network as the API reports it.
type Network struct {
	Name string `json:"name"`
	// Mode is "managed" (Vigil's bridge, DHCP and VXLAN) or "bridge" (the
	// operator's bridge).
	Mode    string    `json:"mode"`
	Subnet  string    `json:"subnet,omitempty"`
	Gateway string    `json:"gateway,omitempty"`
	NAT     bool      `json:"nat,omitempty"`
	Bridge  string    `json:"bridge,omitempty"`
	DNS     []string  `json:"dns,omitempty"`
	VNI     int       `json:"vni,omitempty"`
	Created time.Time `json:"created"`
	// VMs lists the VMs with a NIC on it; Addresses how many addresses
	// are held and Free how many are left (managed networks).
	VMs       []string `json:"vms"`
	Addresses int      `json:"addresses"`
	Free      int      `json:"free,omitempty"`
}

// NICRequest asks for a network card on a network. IP and MAC are chosen
// by Vigil unless given.
type NICRequest struct {
	Network string `json:"network"`
	IP      string `json:"ip,omitempty"`
	MAC     string `json:"mac,omitempty"`
}

// NIC is a VM's network card.
type NIC struct {
	Network string `json:"network"`
	MAC     string `json:"mac"`
	// IP is the address reserved for it (empty on an operator's bridge
	// without a fixed address: see the guest's own report).
	IP string `json:"ip,omitempty"`
}

// PortPublish forwards a port of the VM's host to the VM's first NIC.
type PortPublish struct {
	HostPort  int    `json:"host_port"`
	GuestPort int    `json:"guest_port"`
	Proto     string `json:"proto,omitempty"` // tcp (default) or udp
}
