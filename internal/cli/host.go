package cli

import (
	"fmt"
	"io"

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
				row(w, "NAME", "STATE", "ACCEL", "CPUS", "MEMORY", "VMS", "QEMU", "HEARTBEAT")
				for _, h := range hosts {
					row(w, h.Name, h.State, h.Accel, h.CPUs, humanSize(h.MemoryBytes), h.VMs, h.QEMUVersion, ago(h.LastHeartbeat))
				}
			})
		},
	})
	return cmd
}
