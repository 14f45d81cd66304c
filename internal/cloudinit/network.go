package cloudinit

import (
	"fmt"
	"net/netip"

	"sigs.k8s.io/yaml"
)

// Interface is a guest NIC as network-config describes it.
type Interface struct {
	MAC string
	// Address (with the subnet's prefix length) and Gateway; an invalid
	// Address means DHCP.
	Address netip.Prefix
	Gateway netip.Addr
	DNS     []netip.Addr
}

// NetworkConfig is a network-config (version 2) that names each NIC ethN by
// its MAC and gives it its address: fixed where Vigil reserved one (the
// default route through the first NIC's gateway), DHCP elsewhere.
func NetworkConfig(ifaces []Interface) ([]byte, error) {
	eth := map[string]any{}
	for i, f := range ifaces {
		name := fmt.Sprintf("eth%d", i)
		e := map[string]any{
			"match":    map[string]any{"macaddress": f.MAC},
			"set-name": name,
		}
		if !f.Address.IsValid() {
			e["dhcp4"] = true
		} else {
			e["dhcp4"] = false
			e["addresses"] = []string{f.Address.String()}
			if f.Gateway.IsValid() && i == 0 {
				// gateway4, not routes: Debian 12's cloud-init (22.4)
				// renders routes for ifupdown as "route add", a command
				// minimal systems lack, and gateway4 as ifupdown's own
				// "gateway" line.
				e["gateway4"] = f.Gateway.String()
			}
			if len(f.DNS) > 0 {
				var dns []string
				for _, d := range f.DNS {
					dns = append(dns, d.String())
				}
				e["nameservers"] = map[string]any{"addresses": dns}
			}
		}
		eth[name] = e
	}
	b, err := yaml.Marshal(map[string]any{"version": 2, "ethernets": eth})
	if err != nil {
		return nil, fmt.Errorf("network-config: %w", err)
	}
	return b, ValidateNetworkConfig(b)
}
