package cli

import (
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/vigil-project/vigil/api"
)

func newNetworkCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "network", Short: "Create, list, show and delete networks"}
	cmd.AddCommand(newNetworkCreateCmd(g), newNetworkListCmd(g), newNetworkShowCmd(g), newNetworkDeleteCmd(g))
	return cmd
}

func newNetworkCreateCmd(g *globals) *cobra.Command {
	var req api.NetworkCreateRequest
	cmd := &cobra.Command{
		Use:   "create NAME (--subnet CIDR [--gateway IP] [--nat] | --bridge BRIDGE)",
		Short: "Define a network: managed by Vigil (--subnet) or on your own bridge (--bridge)",
		Long: `Define a network.

With --subnet, Vigil manages it: every host gets a bridge with the gateway
address, a DHCP server that gives each VM the address reserved for it, and
(with --nat) masquerading to the host's uplink; hosts on different machines
are joined by VXLAN into one layer-2 segment. With --bridge, VMs attach to a
bridge you already run on every host, and get their addresses from that
network's own DHCP unless you give one (--network NAME,ip=...).`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			req.Name = args[0]
			n, err := g.client().CreateNetwork(cmd.Context(), req)
			if err != nil {
				return err
			}
			return g.printNetwork(n)
		},
	}
	cmd.Flags().StringVar(&req.Subnet, "subnet", "", "IPv4 subnet Vigil manages, e.g. 10.80.0.0/24")
	cmd.Flags().StringVar(&req.Gateway, "gateway", "", "the hosts' address on it (default: the subnet's first)")
	cmd.Flags().BoolVar(&req.NAT, "nat", false, "masquerade the network's traffic out of each host's uplink")
	cmd.Flags().StringVar(&req.Bridge, "bridge", "", "attach VMs to this existing bridge instead")
	cmd.Flags().StringSliceVar(&req.DNS, "dns", nil, "DNS servers the DHCP server hands out")
	return cmd
}

func newNetworkListCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "List networks",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			nets, err := g.client().Networks(cmd.Context())
			if err != nil {
				return err
			}
			if g.quiet {
				for _, n := range nets {
					fmt.Fprintln(g.out, n.Name)
				}
				return nil
			}
			return g.printValue(nets, func(w io.Writer) {
				row(w, "NAME", "MODE", "SUBNET", "GATEWAY", "NAT", "BRIDGE", "VMS")
				for _, n := range nets {
					row(w, n.Name, n.Mode, orNone(n.Subnet), orNone(n.Gateway), yesNo(n.NAT), orNone(n.Bridge), orNone(strings.Join(n.VMs, ",")))
				}
			})
		},
	}
}

func newNetworkShowCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "show NAME",
		Short: "Show a network",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			n, err := g.client().Network(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			return g.printNetwork(n)
		},
	}
}

func newNetworkDeleteCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "delete NAME",
		Short: "Delete a network no VM uses",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.client().DeleteNetwork(cmd.Context(), args[0])
		},
	}
}

func (g *globals) printNetwork(n api.Network) error {
	if g.quiet {
		fmt.Fprintln(g.out, n.Name)
		return nil
	}
	return g.printValue(n, func(w io.Writer) {
		row(w, "NAME:", n.Name)
		row(w, "MODE:", n.Mode)
		if n.Mode == "managed" {
			row(w, "SUBNET:", n.Subnet)
			row(w, "GATEWAY:", n.Gateway)
			row(w, "NAT:", yesNo(n.NAT))
			row(w, "VXLAN ID:", n.VNI)
			row(w, "ADDRESSES:", fmt.Sprintf("%d held, %d free", n.Addresses, n.Free))
		} else {
			row(w, "BRIDGE:", n.Bridge)
		}
		if len(n.DNS) > 0 {
			row(w, "DNS:", strings.Join(n.DNS, ","))
		}
		row(w, "VMS:", orNone(strings.Join(n.VMs, ",")))
	})
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

// parseNIC reads --network NAME[,ip=ADDR][,mac=MAC].
func parseNIC(s string) (api.NICRequest, error) {
	parts := strings.Split(s, ",")
	nic := api.NICRequest{Network: strings.TrimSpace(parts[0])}
	if nic.Network == "" {
		return nic, fmt.Errorf("--network %q: give a network name first, e.g. --network default,ip=10.80.0.10", s)
	}
	for _, p := range parts[1:] {
		k, v, ok := strings.Cut(strings.TrimSpace(p), "=")
		switch {
		case !ok || v == "":
			return nic, fmt.Errorf("--network %q: %q is not key=value (ip=... or mac=...)", s, p)
		case k == "ip" && nic.IP == "":
			nic.IP = v
		case k == "mac" && nic.MAC == "":
			nic.MAC = v
		default:
			return nic, fmt.Errorf("--network %q: unknown or repeated key %q (ip=... or mac=...)", s, k)
		}
	}
	return nic, nil
}

// parsePublish reads --publish HOSTPORT:GUESTPORT[/tcp|udp].
func parsePublish(s string) (api.PortPublish, error) {
	var p api.PortPublish
	spec, proto, hasProto := strings.Cut(s, "/")
	if hasProto {
		if proto != "tcp" && proto != "udp" {
			return p, fmt.Errorf("--publish %q: the protocol is tcp or udp", s)
		}
		p.Proto = proto
	}
	hp, gp, ok := strings.Cut(spec, ":")
	if !ok {
		return p, fmt.Errorf("--publish %q: want HOSTPORT:GUESTPORT, e.g. 8080:80", s)
	}
	var err error
	if p.HostPort, err = strconv.Atoi(hp); err != nil || p.HostPort < 1 || p.HostPort > 65535 {
		return p, fmt.Errorf("--publish %q: host port %q is not 1-65535", s, hp)
	}
	if p.GuestPort, err = strconv.Atoi(gp); err != nil || p.GuestPort < 1 || p.GuestPort > 65535 {
		return p, fmt.Errorf("--publish %q: guest port %q is not 1-65535", s, gp)
	}
	return p, nil
}
