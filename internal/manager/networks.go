package manager

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/hostproto"
	"github.com/vigil-project/vigil/internal/ipam"
	"github.com/vigil-project/vigil/internal/store"
)

// Networks. A network's record ("networks/<name>") holds its definition;
// who holds what is kept in claims (see store.Claims), created in the same
// transaction as the record that holds them:
//
//	netaddrs/<network>/<ip>/  → vm   an address of a managed network
//	macs/<mac>/               → vm   a MAC address, cluster-wide
//	ports/<proto>/<port>/     → vm   a published host port (a VM may move
//	                                 to any host, so ports are cluster-wide)
//	vnis/<vni>/               → network
//
// So no two VMs ever hold one address, even through two managers at once.
// Each VM's spec carries its NICs with their network's definition, so a
// host wires them with nothing else to look up.

type networkRecord struct {
	Name      string    `json:"name"`
	Subnet    string    `json:"subnet,omitempty"`
	Gateway   string    `json:"gateway,omitempty"`
	NAT       bool      `json:"nat,omitempty"`
	Bridge    string    `json:"bridge,omitempty"`
	DNS       []string  `json:"dns,omitempty"`
	VNI       int       `json:"vni,omitempty"`
	Created   time.Time `json:"created"`
	CreatedBy string    `json:"created_by,omitempty"`
}

func networkKey(name string) string { return "networks/" + name }
func addrClaim(network, ip string) string {
	return "netaddrs/" + network + "/" + ip + "/"
}
func macClaim(mac string) string { return "macs/" + mac + "/" }
func portClaim(proto string, port int) string {
	return "ports/" + proto + "/" + strconv.Itoa(port) + "/"
}
func vniClaim(vni int) string { return "vnis/" + strconv.Itoa(vni) + "/" }

// UserNetwork names QEMU's user-mode network in --network.
const UserNetwork = "user"

// DefaultNetwork is the network VMs join when they name none (if it exists).
const DefaultNetwork = "default"

// firstVNI is the first VXLAN id given out; maxVNI the last (24 bits).
const (
	firstVNI = 100
	maxVNI   = 1<<24 - 1
)

var ifname = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,14}$`)

func (r networkRecord) subnet() (ipam.Subnet, error) {
	return ipam.ParseSubnet(r.Subnet, r.Gateway)
}

func (r networkRecord) managed() bool { return r.Bridge == "" }

func validateNetwork(req api.NetworkCreateRequest) (networkRecord, error) {
	rec := networkRecord{Name: req.Name, NAT: req.NAT, Bridge: strings.TrimSpace(req.Bridge)}
	if !dnsLabel.MatchString(req.Name) || req.Name == UserNetwork {
		return rec, errorf(ErrInvalid, "invalid network name %q: it must be a DNS label of 1-63 lower-case letters, digits and '-' (and not %q, which names user-mode networking)", req.Name, UserNetwork)
	}
	switch {
	case req.Subnet == "" && rec.Bridge == "":
		return rec, errorf(ErrInvalid, "network %s needs --subnet (a network Vigil manages) or --bridge (a bridge you run on every host)", req.Name)
	case req.Subnet != "" && rec.Bridge != "":
		return rec, errorf(ErrInvalid, "network %s: give --subnet or --bridge, not both", req.Name)
	case rec.Bridge != "":
		if !ifname.MatchString(rec.Bridge) {
			return rec, errorf(ErrInvalid, "bridge %q is not an interface name (1-15 letters, digits, '_', '.', '-')", rec.Bridge)
		}
		if strings.HasPrefix(rec.Bridge, "vg") {
			return rec, errorf(ErrInvalid, "bridge %q: names starting with vg are Vigil's own interfaces", rec.Bridge)
		}
		if req.NAT || req.Gateway != "" {
			return rec, errorf(ErrInvalid, "network %s: --nat and --gateway are for managed networks; your bridge's network has its own", req.Name)
		}
	default:
		s, err := ipam.ParseSubnet(req.Subnet, req.Gateway)
		if err != nil {
			return rec, wrapf(ErrInvalid, err, "network %s", req.Name)
		}
		rec.Subnet, rec.Gateway = s.Prefix.String(), s.Gateway.String()
	}
	for _, d := range req.DNS {
		a, err := netip.ParseAddr(strings.TrimSpace(d))
		if err != nil || !a.Is4() {
			return rec, errorf(ErrInvalid, "dns server %q is not an IPv4 address", d)
		}
		rec.DNS = append(rec.DNS, a.String())
	}
	return rec, nil
}

// CreateNetwork defines a network.
func (m *Manager) CreateNetwork(ctx context.Context, req api.NetworkCreateRequest, by string) (api.Network, error) {
	rec, err := validateNetwork(req)
	if err != nil {
		return api.Network{}, err
	}
	rec.Created, rec.CreatedBy = time.Now().UTC(), by
	all, err := m.networkRecords(ctx)
	if err != nil {
		return api.Network{}, err
	}
	used := map[int]bool{}
	for _, o := range all {
		if o.Name == rec.Name {
			return api.Network{}, errorf(ErrConflict, "network %s already exists: see 'vigil network show %s'", rec.Name, rec.Name)
		}
		if err := conflicts(rec, o); err != nil {
			return api.Network{}, err
		}
		used[o.VNI] = true
	}
	for tries := 0; ; tries++ {
		claims := map[string]string{}
		if rec.managed() {
			rec.VNI = firstVNI
			for used[rec.VNI] {
				rec.VNI++
			}
			if rec.VNI > maxVNI {
				return api.Network{}, errorf(ErrConflict, "no VXLAN id is left for network %s", rec.Name)
			}
			claims[vniClaim(rec.VNI)] = rec.Name
		}
		_, err = m.store.CreateClaiming(ctx, networkKey(rec.Name), rec, claims)
		var ce *store.ClaimError
		if errors.As(err, &ce) && tries < 10 {
			used[rec.VNI] = true // another network took it meanwhile
			continue
		}
		if errors.Is(err, store.ErrExists) {
			return api.Network{}, errorf(ErrConflict, "network %s already exists: see 'vigil network show %s'", rec.Name, rec.Name)
		}
		if err != nil {
			return api.Network{}, wrapf(ErrUnavailable, err, "create network %s", rec.Name)
		}
		break
	}
	// Overlap is not one key that a claim could guard: check again now
	// that ours is stored. Of two overlapping networks made at once, the
	// later one (by store revision) withdraws.
	if err := m.withdrawIfOverlapping(ctx, rec); err != nil {
		return api.Network{}, err
	}
	m.publish(api.Event{Type: "network.created", Message: rec.Name})
	return m.networkView(ctx, rec)
}

// conflicts says why rec cannot live beside o.
func conflicts(rec, o networkRecord) error {
	if rec.managed() && o.managed() {
		a, _ := netip.ParsePrefix(rec.Subnet)
		b, err := netip.ParsePrefix(o.Subnet)
		if err == nil && a.Overlaps(b) {
			return errorf(ErrConflict, "subnet %s overlaps network %s (%s): pick a subnet outside it", rec.Subnet, o.Name, o.Subnet)
		}
	}
	if !rec.managed() && rec.Bridge == o.Bridge {
		return errorf(ErrConflict, "bridge %s is already network %s", rec.Bridge, o.Name)
	}
	return nil
}

func (m *Manager) withdrawIfOverlapping(ctx context.Context, rec networkRecord) error {
	kvs, err := m.store.List(ctx, "networks/")
	if err != nil {
		return wrapf(ErrUnavailable, err, "list networks")
	}
	var mine int64
	for _, kv := range kvs {
		if kv.Key == rec.Name {
			mine = kv.Created
		}
	}
	for _, kv := range kvs {
		var o networkRecord
		if kv.Key == rec.Name || kv.Created > mine || json.Unmarshal(kv.Value, &o) != nil {
			continue
		}
		if err := conflicts(rec, o); err != nil {
			_ = m.store.Delete(context.WithoutCancel(ctx), networkKey(rec.Name))
			if rec.VNI > 0 {
				_ = m.store.Release(context.WithoutCancel(ctx), vniClaim(rec.VNI))
			}
			return err
		}
	}
	return nil
}

func (m *Manager) networkRecords(ctx context.Context) ([]networkRecord, error) {
	kvs, err := m.store.List(ctx, "networks/")
	if err != nil {
		return nil, wrapf(ErrUnavailable, err, "list networks")
	}
	out := make([]networkRecord, 0, len(kvs))
	for _, kv := range kvs {
		var r networkRecord
		if err := json.Unmarshal(kv.Value, &r); err != nil {
			m.log.Warn("unreadable network record", "key", kv.Key, "err", err)
			continue
		}
		out = append(out, r)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

func (m *Manager) network(ctx context.Context, name string) (networkRecord, error) {
	var r networkRecord
	_, err := m.store.Get(ctx, networkKey(name), &r)
	if errors.Is(err, store.ErrNotFound) {
		return r, errorf(ErrNotFound, "network %s does not exist: see 'vigil network list'", name)
	}
	if err != nil {
		return r, wrapf(ErrUnavailable, err, "read network %s", name)
	}
	return r, nil
}

// Networks reports every network.
func (m *Manager) Networks(ctx context.Context) ([]api.Network, error) {
	recs, err := m.networkRecords(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]api.Network, 0, len(recs))
	for _, r := range recs {
		v, err := m.networkView(ctx, r)
		if err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, nil
}

// Network reports one network.
func (m *Manager) Network(ctx context.Context, name string) (api.Network, error) {
	r, err := m.network(ctx, name)
	if err != nil {
		return api.Network{}, err
	}
	return m.networkView(ctx, r)
}

func (m *Manager) networkView(ctx context.Context, r networkRecord) (api.Network, error) {
	v := api.Network{Name: r.Name, Mode: "managed", Subnet: r.Subnet, Gateway: r.Gateway, NAT: r.NAT, Bridge: r.Bridge,
		DNS: r.DNS, VNI: r.VNI, Created: r.Created, VMs: []string{}}
	if !r.managed() {
		v.Mode = "bridge"
	}
	rs, err := m.records(ctx)
	if err != nil {
		return v, err
	}
	for _, s := range rs {
		for _, n := range s.rec.Spec.NICs {
			if n.Network.Name == r.Name {
				v.VMs = append(v.VMs, s.rec.Spec.Name)
				if n.IP != "" {
					v.Addresses++
				}
				break
			}
		}
	}
	if sub, err := r.subnet(); err == nil && r.managed() {
		v.Free = sub.Size() - v.Addresses
	}
	return v, nil
}

// DeleteNetwork removes a network no VM uses.
func (m *Manager) DeleteNetwork(ctx context.Context, name string) error {
	r, err := m.network(ctx, name)
	if err != nil {
		return err
	}
	v, err := m.networkView(ctx, r)
	if err != nil {
		return err
	}
	if len(v.VMs) > 0 {
		return errorf(ErrConflict, "network %s is in use by %s: delete those VMs first", name, strings.Join(v.VMs, ", "))
	}
	if err := m.store.Delete(ctx, networkKey(name)); err != nil {
		return wrapf(ErrUnavailable, err, "delete network %s", name)
	}
	if r.VNI > 0 {
		if err := m.store.Release(ctx, vniClaim(r.VNI)); err != nil {
			m.log.Warn("vxlan id not released", "network", name, "vni", r.VNI, "err", err)
		}
	}
	m.publish(api.Event{Type: "network.deleted", Message: name})
	return nil
}

// networkSpec is a network as hosts get it, with the VXLAN peers of host.
func (m *Manager) networkSpec(r networkRecord, host string) hostproto.NetworkSpec {
	s := hostproto.NetworkSpec{Name: r.Name, Bridge: r.Bridge, Subnet: r.Subnet, Gateway: r.Gateway, NAT: r.NAT,
		DNS: r.DNS, VNI: r.VNI}
	if r.managed() {
		s.Peers = m.vxlanPeers(host)
	}
	return s
}

// vxlanPeers are the addresses of the hosts on other machines than host's.
// Hosts that share a machine (one address) share its bridges instead.
func (m *Manager) vxlanPeers(host string) []string {
	mine, err := m.hostIP(host)
	if err != nil {
		return nil
	}
	seen := map[string]bool{mine: true}
	var out []string
	for _, e := range m.hosts.entries() {
		ip, err := m.hostIP(e.h.Name())
		if err != nil || seen[ip] {
			continue
		}
		seen[ip] = true
		out = append(out, ip)
	}
	sort.Strings(out)
	return out
}

// networkPush is how often the leader tells every host the networks its
// VMs use, with the VXLAN peers of the moment: a host that joins reaches
// the others' VMs within this time.
const networkPush = 10 * time.Second

func (m *Manager) pushNetworksLoop(ctx context.Context) {
	t := time.NewTicker(networkPush)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		m.pushNetworks(ctx)
	}
}

// pushNetworks sends each host the networks its VMs use.
func (m *Manager) pushNetworks(ctx context.Context) {
	recs, err := m.networkRecords(ctx)
	if err != nil || len(recs) == 0 {
		return
	}
	byName := map[string]networkRecord{}
	for _, r := range recs {
		byName[r.Name] = r
	}
	rs, err := m.cachedRecords(ctx) // pushed again in 10 s: the mirror will do
	if err != nil {
		return
	}
	used := map[string]map[string]bool{} // host → networks
	for _, s := range rs {
		for _, n := range s.rec.Spec.NICs {
			if used[s.rec.Host] == nil {
				used[s.rec.Host] = map[string]bool{}
			}
			used[s.rec.Host][n.Network.Name] = true
		}
	}
	var wg sync.WaitGroup
	for host, nets := range used {
		req := hostproto.NetworksRequest{}
		for name := range nets {
			if r, ok := byName[name]; ok {
				req.Networks = append(req.Networks, m.networkSpec(r, host))
			}
		}
		sort.Slice(req.Networks, func(i, j int) bool { return req.Networks[i].Name < req.Networks[j].Name })
		wg.Add(1)
		go func() {
			defer wg.Done()
			cctx, cancel := context.WithTimeout(ctx, networkPush)
			defer cancel()
			if _, err := hostproto.SetNetworks.Call(cctx, m.hostNamed(host), req); err != nil && ctx.Err() == nil {
				m.log.Debug("networks not pushed", "host", host, "err", err)
			}
		}()
	}
	wg.Wait()
}

// nicsOn is a VM's NICs as host gets them: each network's VXLAN peers
// are the hosts on other machines than host's (the ones of the VM's old
// host would include host itself and leave out the old one).
func (m *Manager) nicsOn(nics []hostproto.NIC, host string) []hostproto.NIC {
	if len(nics) == 0 {
		return nics
	}
	out := make([]hostproto.NIC, len(nics))
	for i, n := range nics {
		out[i] = n
		if n.Network.Bridge == "" {
			out[i].Network.Peers = m.vxlanPeers(host)
		}
	}
	return out
}

// allocNICs picks each NIC's network, MAC and address for a new VM, and
// the claims that hold them. No NICs asked for: the default network if
// there is one, else user-mode networking.
func (m *Manager) allocNICs(ctx context.Context, req api.VMCreateRequest, uuid, host string) ([]hostproto.NIC, map[string]string, error) {
	asked := req.NICs
	if len(asked) == 0 {
		if _, err := m.network(ctx, DefaultNetwork); err == nil {
			asked = []api.NICRequest{{Network: DefaultNetwork}}
		} else if !errors.Is(err, ErrNotFound) {
			return nil, nil, err
		}
	}
	if len(asked) == 1 && asked[0].Network == UserNetwork {
		if asked[0].IP != "" || asked[0].MAC != "" {
			return nil, nil, errorf(ErrInvalid, "--network user takes no ip or mac: QEMU's user-mode network gives the guest 10.0.2.15")
		}
		asked = nil
	}
	if len(asked) == 0 {
		if len(req.Publish) > 0 {
			return nil, nil, errorf(ErrInvalid, "--publish needs the VM on a network (--network NAME); on user-mode networking its port 80 is at its endpoint")
		}
		return nil, nil, nil
	}
	if len(asked) > 8 {
		return nil, nil, errorf(ErrInvalid, "%d NICs: at most 8", len(asked))
	}
	claims := map[string]string{}
	var nics []hostproto.NIC
	for i, a := range asked {
		if a.Network == UserNetwork {
			return nil, nil, errorf(ErrInvalid, "--network user cannot be combined with other networks")
		}
		r, err := m.network(ctx, a.Network)
		if err != nil {
			return nil, nil, err
		}
		nic := hostproto.NIC{Network: m.networkSpec(r, host)}
		if nic.MAC, err = m.pickMAC(ctx, a.MAC, uuid, i, claims); err != nil {
			return nil, nil, err
		}
		claims[macClaim(nic.MAC)] = req.Name
		if nic.IP, err = m.pickIP(ctx, r, a.IP, claims); err != nil {
			return nil, nil, err
		}
		if nic.IP != "" && r.managed() {
			claims[addrClaim(r.Name, nic.IP)] = req.Name
		}
		nics = append(nics, nic)
	}
	for _, p := range req.Publish {
		proto := p.Proto
		if proto == "" {
			proto = "tcp"
		}
		switch {
		case proto != "tcp" && proto != "udp":
			return nil, nil, errorf(ErrInvalid, "--publish %d:%d/%s: the protocol is tcp or udp", p.HostPort, p.GuestPort, p.Proto)
		case p.HostPort < 1024 || p.HostPort > 65535:
			return nil, nil, errorf(ErrInvalid, "--publish %d:%d: the host port must be 1024-65535 (lower ports belong to the host's own services)", p.HostPort, p.GuestPort)
		case p.GuestPort < 1 || p.GuestPort > 65535:
			return nil, nil, errorf(ErrInvalid, "--publish %d:%d: the guest port must be 1-65535", p.HostPort, p.GuestPort)
		case nics[0].IP == "":
			return nil, nil, errorf(ErrInvalid, "--publish needs the first NIC's address: give it ip= on bridge network %s", nics[0].Network.Name)
		}
		k := portClaim(proto, p.HostPort)
		if _, dup := claims[k]; dup {
			return nil, nil, errorf(ErrInvalid, "--publish: host port %d/%s is given twice", p.HostPort, proto)
		}
		if holder, err := m.store.ClaimHolder(ctx, k); err != nil {
			return nil, nil, wrapf(ErrUnavailable, err, "read published ports")
		} else if holder != "" {
			return nil, nil, errorf(ErrConflict, "host port %d/%s is already published by vm %s: pick another", p.HostPort, proto, holder)
		}
		claims[k] = req.Name
		nics[0].Publish = append(nics[0].Publish, hostproto.Publish{Proto: proto, HostPort: p.HostPort, GuestPort: p.GuestPort})
	}
	return nics, claims, nil
}

func (m *Manager) pickMAC(ctx context.Context, asked, uuid string, nic int, claims map[string]string) (string, error) {
	if asked != "" {
		mac, err := ipam.ParseMAC(asked)
		if err != nil {
			return "", wrapf(ErrInvalid, err, "NIC %d", nic)
		}
		holder, err := m.store.ClaimHolder(ctx, macClaim(mac.String()))
		if err != nil {
			return "", wrapf(ErrUnavailable, err, "read MAC addresses")
		}
		if holder != "" {
			return "", errorf(ErrConflict, "MAC address %s is already vm %s's: pick another or leave it out", mac, holder)
		}
		return mac.String(), nil
	}
	for attempt := 0; attempt < 32; attempt++ {
		mac := ipam.MAC(uuid, nic, attempt).String()
		if _, dup := claims[macClaim(mac)]; dup {
			continue
		}
		holder, err := m.store.ClaimHolder(ctx, macClaim(mac))
		if err != nil {
			return "", wrapf(ErrUnavailable, err, "read MAC addresses")
		}
		if holder == "" {
			return mac, nil
		}
	}
	return "", errorf(ErrConflict, "no free MAC address found for NIC %d: give one with mac=", nic)
}

func (m *Manager) pickIP(ctx context.Context, r networkRecord, asked string, claims map[string]string) (string, error) {
	if !r.managed() {
		if asked == "" {
			return "", nil // the operator's DHCP
		}
		a, err := netip.ParseAddr(asked)
		if err != nil || !a.Is4() {
			return "", errorf(ErrInvalid, "address %q is not an IPv4 address", asked)
		}
		return a.String(), nil
	}
	sub, err := r.subnet()
	if err != nil {
		return "", wrapf(ErrUnavailable, err, "network %s has a bad subnet", r.Name)
	}
	held, err := m.store.List(ctx, "netaddrs/"+r.Name+"/")
	if err != nil {
		return "", wrapf(ErrUnavailable, err, "read the addresses of network %s", r.Name)
	}
	taken := map[netip.Addr]string{}
	for _, kv := range held {
		ip := strings.TrimSuffix(kv.Key, "/")
		if a, err := netip.ParseAddr(ip); err == nil {
			taken[a] = string(kv.Value)
		}
	}
	for k := range claims {
		if ip, ok := strings.CutPrefix(k, "netaddrs/"+r.Name+"/"); ok {
			if a, err := netip.ParseAddr(strings.TrimSuffix(ip, "/")); err == nil {
				taken[a] = "this vm"
			}
		}
	}
	if asked != "" {
		a, err := netip.ParseAddr(strings.TrimSpace(asked))
		if err != nil {
			return "", errorf(ErrInvalid, "address %q is not an IPv4 address", asked)
		}
		if err := sub.Check(a); err != nil {
			return "", wrapf(ErrInvalid, err, "network %s", r.Name)
		}
		if holder, ok := taken[a]; ok {
			return "", errorf(ErrConflict, "address %s on network %s is already held by %s: pick another or leave ip= out", a, r.Name, holder)
		}
		return a.String(), nil
	}
	a, err := sub.Next(func(a netip.Addr) bool { _, ok := taken[a]; return ok })
	if err != nil {
		return "", wrapf(ErrConflict, err, "network %s", r.Name)
	}
	return a.String(), nil
}

// nicClaims are the claims a VM's NICs hold (to release them with it).
func nicClaims(vm string, nics []hostproto.NIC) []string {
	var out []string
	for _, n := range nics {
		out = append(out, macClaim(n.MAC))
		if n.IP != "" && n.Network.Bridge == "" {
			out = append(out, addrClaim(n.Network.Name, n.IP))
		}
		for _, p := range n.Publish {
			out = append(out, portClaim(p.Proto, p.HostPort))
		}
	}
	return out
}

// nicViews are a VM's NICs as the API shows them.
func nicViews(nics []hostproto.NIC) []api.NIC {
	var out []api.NIC
	for _, n := range nics {
		out = append(out, api.NIC{Network: n.Network.Name, MAC: n.MAC, IP: n.IP})
	}
	return out
}

func publishViews(nics []hostproto.NIC) []api.PortPublish {
	var out []api.PortPublish
	for _, n := range nics {
		for _, p := range n.Publish {
			out = append(out, api.PortPublish{HostPort: p.HostPort, GuestPort: p.GuestPort, Proto: p.Proto})
		}
	}
	return out
}

// endpointOf is where the guest's port 80 is reached from its host: its
// first NIC's address, a forwarded port on user-mode networking, or
// nothing Vigil knows (an operator's bridge whose DHCP gives the address).
func endpointOf(spec hostproto.VMSpec) string {
	switch {
	case len(spec.NICs) == 0:
		return fmt.Sprintf("127.0.0.1:%d", spec.HostPort)
	case spec.NICs[0].IP != "":
		return net.JoinHostPort(spec.NICs[0].IP, "80")
	}
	return ""
}

func (m *Manager) handleNetworkCreate(w http.ResponseWriter, r *http.Request) {
	var req api.NetworkCreateRequest
	if err := decodeBody(r, &req); err != nil {
		writeError(w, m.log, err)
		return
	}
	n, err := m.CreateNetwork(r.Context(), req, callerOf(r).String())
	if err != nil {
		writeError(w, m.log, err)
		return
	}
	writeJSON(w, http.StatusCreated, n)
}

func (m *Manager) handleNetworkList(w http.ResponseWriter, r *http.Request) {
	out, err := m.Networks(r.Context())
	if err != nil {
		writeError(w, m.log, err)
		return
	}
	writeJSON(w, http.StatusOK, out)
}

func (m *Manager) handleNetworkGet(w http.ResponseWriter, r *http.Request) {
	out, err := m.Network(r.Context(), r.PathValue("name"))
	if err != nil {
		writeError(w, m.log, err)
		return
	}
	writeJSON(w, http.StatusOK, out)
}

func (m *Manager) handleNetworkDelete(w http.ResponseWriter, r *http.Request) {
	if err := m.DeleteNetwork(r.Context(), r.PathValue("name")); err != nil {
		writeError(w, m.log, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}
