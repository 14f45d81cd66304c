package hostagent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/vigil-project/vigil/internal/cloudinit"
	"github.com/vigil-project/vigil/internal/hostnet"
	"github.com/vigil-project/vigil/internal/hostproto"
	"github.com/vigil-project/vigil/internal/qemu"
)

// Networks. A VM with NICs gets a tap per NIC, wired by hostnet before each
// QEMU start (or adoption) from what its spec says, and unwired when its
// QEMU ends. A host keeps a network only while one of its VMs uses it.

// ErrNoNetworking means this host cannot make bridges and taps.
var ErrNoNetworking = errors.New("this host agent cannot make networks")

// hostNet is the host's network side, made at first use (root only).
func (a *Agent) hostNet() (*hostnet.Host, error) {
	a.netOnce.Do(func() {
		if os.Geteuid() != 0 {
			a.netErr = fmt.Errorf("%w: VMs on networks need the host agent to run as root (it makes bridges, taps and firewall rules); use --network user", ErrNoNetworking)
			return
		}
		a.net = hostnet.New(a.log, a.cfg.Name)
	})
	return a.net, a.netErr
}

// machineNICs are the QEMU NICs of spec on this host.
func (a *Agent) machineNICs(spec hostproto.VMSpec) []qemu.NIC {
	var out []qemu.NIC
	vhost := len(spec.NICs) > 0 && hostnet.VhostNet()
	for i, n := range spec.NICs {
		out = append(out, qemu.NIC{Tap: hostnet.TapName(a.cfg.Name, spec.Name, i), MAC: n.MAC, Vhost: vhost})
	}
	return out
}

// hostNetwork turns a network as the manager sent it into hostnet's terms.
func (a *Agent) hostNetwork(s hostproto.NetworkSpec) (hostnet.Network, error) {
	n := hostnet.Network{Name: s.Name, Bridge: s.Bridge, NAT: s.NAT, VNI: s.VNI}
	if s.Bridge == "" {
		p, err := netip.ParsePrefix(s.Subnet)
		if err != nil {
			return n, fmt.Errorf("network %s: subnet %q: %w", s.Name, s.Subnet, err)
		}
		g, err := netip.ParseAddr(s.Gateway)
		if err != nil || !p.Contains(g) {
			return n, fmt.Errorf("network %s: gateway %q is not in %s", s.Name, s.Gateway, p)
		}
		n.Subnet, n.Gateway = p, g
	}
	for _, d := range s.DNS {
		if ip, err := netip.ParseAddr(d); err == nil {
			n.DNS = append(n.DNS, ip)
		}
	}
	if local, err := netip.ParseAddr(a.cfg.MigrationHost); err == nil && !local.IsLoopback() {
		n.Local = local
		for _, p := range s.Peers {
			if ip, err := netip.ParseAddr(p); err == nil && ip != local {
				n.Peers = append(n.Peers, ip)
			}
		}
	}
	return n, nil
}

// plugNICs wires each of the VM's NICs: its network on this host, its tap,
// its address reservation and its rules. All or none.
func (v *vm) plugNICs() error {
	if len(v.spec.NICs) == 0 {
		return nil
	}
	hn, err := v.agent.hostNet()
	if err != nil {
		return fmt.Errorf("start %s: %w", v.spec.Name, err)
	}
	var done []string
	for i, nic := range v.spec.NICs {
		n, err := v.agent.hostNetwork(nic.Network)
		if err == nil {
			err = hn.EnsureNetwork(n)
		}
		var tap string
		if err == nil {
			tap, err = hn.Plug(v.hostNIC(i, nic))
		}
		if err != nil {
			for _, t := range done {
				_ = hn.Unplug(t)
			}
			return fmt.Errorf("start %s: NIC %d on network %s: %w", v.spec.Name, i, nic.Network.Name, err)
		}
		done = append(done, tap)
	}
	return nil
}

func (v *vm) hostNIC(i int, nic hostproto.NIC) hostnet.NIC {
	mac, _ := net.ParseMAC(nic.MAC)
	out := hostnet.NIC{VM: v.spec.Name, Index: i, Network: nic.Network.Name, MAC: mac, Hostname: v.spec.Name}
	if ip, err := netip.ParseAddr(nic.IP); err == nil {
		out.IP = ip
	}
	for _, p := range nic.Publish {
		out.Publish = append(out.Publish, hostnet.Publish{Proto: p.Proto, HostPort: uint16(p.HostPort), GuestPort: uint16(p.GuestPort)})
	}
	return out
}

// unplugNICs unwires the VM's NICs once its QEMU has ended, and takes a
// network off this host when no VM of the host uses it any more.
func (v *vm) unplugNICs() {
	if len(v.spec.NICs) == 0 || v.agent.net == nil {
		return
	}
	hn := v.agent.net
	for i, nic := range v.spec.NICs {
		if err := hn.Unplug(hostnet.TapName(v.agent.cfg.Name, v.spec.Name, i)); err != nil {
			v.log.Warn("tap not removed", "nic", i, "err", err)
		}
		if err := hn.RemoveNetwork(nic.Network.Name); err != nil && !strings.Contains(err.Error(), "in use") {
			v.log.Warn("network not taken off this host", "network", nic.Network.Name, "err", err)
		}
	}
}

// announce tells the network where the guest now is (after a move).
func (v *vm) announce(p *qemu.Process) {
	if len(v.spec.NICs) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := p.Monitor.AnnounceSelf(ctx); err != nil {
		v.log.Warn("announce-self failed: the network learns the guest's new place at its next packet", "err", err)
	}
}

// arpAnswered is when the guest last answered ARP on its first NIC (ok
// false: no NIC with a known address here).
func (v *vm) arpAnswered() (time.Time, bool) {
	if len(v.spec.NICs) == 0 || v.agent.net == nil {
		return time.Time{}, false
	}
	return v.agent.net.Answered(hostnet.TapName(v.agent.cfg.Name, v.spec.Name, 0))
}

// tapCounters sums the VM's taps' counters (the host's view: rx is what
// the guest sent). Only what the guest sends shows it alive: the host sends
// to it (ARP probes, other VMs' broadcasts) whether it runs or not.
func (v *vm) tapCounters() hostnet.Counters {
	var n hostnet.Counters
	for i := range v.spec.NICs {
		if c, err := hostnet.TapCounters(hostnet.TapName(v.agent.cfg.Name, v.spec.Name, i)); err == nil {
			n.RxPackets += c.RxPackets
			n.TxPackets += c.TxPackets
			n.RxBytes += c.RxBytes
			n.TxBytes += c.TxBytes
		}
	}
	return n
}

// networkConfig is the guest's cloud-init network-config: each NIC by its
// MAC, with its reserved address where it has one.
func (v *vm) networkConfig() ([]byte, error) {
	var ifs []cloudinit.Interface
	for _, nic := range v.spec.NICs {
		f := cloudinit.Interface{MAC: nic.MAC}
		if ip, err := netip.ParseAddr(nic.IP); err == nil && nic.Network.Subnet != "" {
			p, err := netip.ParsePrefix(nic.Network.Subnet)
			if err != nil {
				return nil, fmt.Errorf("network %s: subnet %q: %w", nic.Network.Name, nic.Network.Subnet, err)
			}
			f.Address = netip.PrefixFrom(ip, p.Bits())
			f.Gateway, _ = netip.ParseAddr(nic.Network.Gateway)
			for _, d := range nic.Network.DNS {
				if a, err := netip.ParseAddr(d); err == nil {
					f.DNS = append(f.DNS, a)
				}
			}
		}
		ifs = append(ifs, f)
	}
	return cloudinit.NetworkConfig(ifs)
}

// SetNetworks updates the networks this host has wired (their VXLAN peers
// change as hosts come and go); networks no VM of this host uses are not
// made for it.
func (a *Agent) SetNetworks(_ context.Context, r hostproto.NetworksRequest) (hostproto.None, error) {
	if a.net == nil {
		return hostproto.None{}, nil
	}
	var errs []error
	for _, s := range r.Networks {
		if !a.net.Has(s.Name) {
			continue
		}
		n, err := a.hostNetwork(s)
		if err == nil {
			err = a.net.EnsureNetwork(n)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("network %s: %w", s.Name, err))
		}
	}
	return hostproto.None{}, errors.Join(errs...)
}
