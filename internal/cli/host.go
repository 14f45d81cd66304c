package cli

import (
	"fmt"
	"io"
	"time"

	"github.com/vigil-project/vigil/api"

	"github.com/spf13/cobra"
)

func newHostCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "host", Short: "Inspect hypervisor hosts"}
	cmd.AddCommand(&cobra.Command{
		Use:   "list",
		Short: "List hosts with their capacity",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			hosts, err := g.client().Hosts(cmd.Context())
			if err != nil {
				return err
			}
			if g.quiet {
				for _, h := range hosts {
					fmt.Fprintln(g.out, h.Name)
				}
				return nil
			}
			return g.printValue(hosts, func(w io.Writer) {
				row(w, "NAME", "STATE", "ACCEL", "CPUS", "MEMORY", "VMS", "POOL", "QEMU", "HEARTBEAT")
				for _, h := range hosts {
					state, pool := h.State, h.StoragePool
					if h.Drained {
						state += ",drained"
					}
					if pool == "" {
						pool = "-"
					}
					if h.PoolLocks == "not-shared" {
						pool += " (locks not shared!)"
					}
					row(w, h.Name, state, h.Accel, h.CPUs, humanSize(h.MemoryBytes), h.VMs, pool, h.QEMUVersion, ago(h.LastHeartbeat))
				}
			})
		},
	})
	cmd.AddCommand(newHostShowCmd(g))
	var forHost string
	jt := &cobra.Command{
		Use:   "join-token",
		Short: "Make a token that admits one new host (valid for an hour); the token is the last line",
		Long: `Make a token that admits one new host, valid for an hour. It carries the fingerprint of the
cluster's CA: the host checks it talks to this cluster before it sends anything, makes its own key,
and gets a certificate naming it. A token never lets a host take the name of a registered host; to
replace one that lost its keys, make a token for it with --host NAME.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			tok, err := g.client().JoinToken(cmd.Context(), forHost)
			if err != nil {
				return err
			}
			if !g.quiet {
				who := "one new host"
				if tok.Host != "" {
					who = "host " + tok.Host
				}
				fmt.Fprintf(g.out, "Start the host agent with --join-token; this token admits %s until %s:\n", who, tok.Expires.Local().Format(time.DateTime))
			}
			fmt.Fprintln(g.out, tok.Token)
			return nil
		},
	}
	jt.Flags().StringVar(&forHost, "host", "", "admit only this host name, even if registered (to replace a host that lost its keys)")
	cmd.AddCommand(jt)
	cmd.AddCommand(&cobra.Command{
		Use:   "drain NAME",
		Short: "Keep new VMs off a host and move its VMs away (running ones live)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			res, err := g.client().DrainHost(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			if g.quiet {
				return nil
			}
			err = g.printValue(res, func(w io.Writer) {
				fmt.Fprintf(w, "host %s is drained: no new VMs go there ('vigil host enable %s' undoes it)\n", res.Host, res.Host)
				for _, mv := range res.Moved {
					how := "moved (stopped)"
					if mv.Live {
						how = fmt.Sprintf("migrated live, downtime %.0f ms", mv.DowntimeMS)
					}
					fmt.Fprintf(w, "  %s -> %s: %s\n", mv.VM, mv.To, how)
				}
				for _, st := range res.Stayed {
					fmt.Fprintf(w, "  %s stays: %s\n", st.VM, st.Reason)
				}
			})
			if err == nil && len(res.Stayed) > 0 {
				return fmt.Errorf("%d vm(s) could not leave host %s", len(res.Stayed), res.Host)
			}
			return err
		},
	})
	cmd.AddCommand(&cobra.Command{
		Use:   "enable NAME",
		Short: "Let the scheduler place VMs on a drained host again",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := g.client().EnableHost(cmd.Context(), args[0]); err != nil {
				return err
			}
			if !g.quiet {
				fmt.Fprintf(g.out, "host %s takes new VMs again\n", args[0])
			}
			return nil
		},
	})
	return cmd
}

func newVMMigrateCmd(g *globals) *cobra.Command {
	var to string
	cmd := &cobra.Command{
		Use:   "migrate NAME [--to HOST]",
		Short: "Move a VM to another host of its storage pool: live if it runs (the guest keeps running)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			vm, err := g.client().Migrate(cmd.Context(), args[0], to)
			if err != nil {
				return err
			}
			if g.quiet {
				return nil
			}
			return g.printValue(vm, func(w io.Writer) {
				fmt.Fprintf(w, "%s is on %s (%s)", vm.Name, vm.Host, vm.State)
				if op := vm.LastOperation; op != nil && op.Action == "migrate" && vm.State == "running" {
					fmt.Fprintf(w, ": migrated live in %.0f ms, guest paused %.0f ms", op.DurationMS, op.PausedMS)
				}
				fmt.Fprintln(w)
			})
		},
	}
	cmd.Flags().StringVar(&to, "to", "", "destination host (default: the scheduler picks one of the VM's pool)")
	return cmd
}

// hostView is a host and, if it booted from the network, its last boot.
type hostView struct {
	api.Host
	Boot *api.BootMachine `json:"boot,omitempty"`
}

func newHostShowCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "show NAME",
		Short: "Show a host, and for a network-booted one the image and configuration it booted with",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c := g.client()
			hosts, err := c.Hosts(cmd.Context())
			if err != nil {
				return err
			}
			var v hostView
			found := false
			for _, h := range hosts {
				if h.Name == args[0] {
					v.Host, found = h, true
				}
			}
			if !found {
				return fmt.Errorf("no host %s: see 'vigil host list'", args[0])
			}
			if ms, err := c.BootMachines(cmd.Context()); err == nil {
				for _, m := range ms {
					if m.HostName == args[0] && m.State == api.MachineAdmitted {
						m := m
						v.Boot = &m
					}
				}
			}
			return g.printValue(v, func(w io.Writer) {
				row(w, "NAME:", v.Name)
				row(w, "STATE:", v.State)
				row(w, "CPUS:", v.CPUs)
				row(w, "MEMORY:", humanSize(v.MemoryBytes))
				row(w, "VMS:", v.VMs)
				row(w, "QEMU:", v.QEMUVersion)
				row(w, "HEARTBEAT:", ago(v.LastHeartbeat))
				if b := v.Boot; b != nil {
					row(w, "BOOTED FROM:", "network, machine "+b.MAC+", profile "+b.Profile)
					row(w, "IMAGE:", orNone(b.LastImage))
					row(w, "CONFIGURATION:", orNone(b.LastConfig)+" ("+ago(b.LastConfigAt)+")")
					row(w, "BOOTS:", b.Boots)
				}
			})
		},
	}
}
