package cli

import (
	"fmt"
	"io"
	"time"

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
	cmd.AddCommand(&cobra.Command{
		Use:   "join-token",
		Short: "Make a token that admits one new host (valid for an hour); the token is the last line",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			tok, exp, err := g.client().JoinToken(cmd.Context())
			if err != nil {
				return err
			}
			if !g.quiet {
				fmt.Fprintf(g.out, "Start the host agent with --join-token; this token admits one host until %s:\n", exp.Local().Format(time.DateTime))
			}
			fmt.Fprintln(g.out, tok)
			return nil
		},
	})
	return cmd
}
