package cli

import (
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"
	"github.com/vigil-project/vigil/api"
)

func newVMProtectCmd(g *globals) *cobra.Command {
	var secondary string
	var interval time.Duration
	cmd := &cobra.Command{
		Use:   "protect NAME [--secondary-host HOST] [--interval 500ms]",
		Short: "Keep a synchronized standby of a VM on another host: if its host dies it continues there, same boot, from its last checkpoint",
		Long: `Keep a synchronized standby of a VM on another host of its storage pool.

The running guest is checkpointed every interval (memory and disk of one
instant; the guest stops only for the final few milliseconds of each) to a
standby on the secondary host, which does not run it. The guest's outgoing
packets are held until the checkpoint that produced them is committed on the
secondary, so no client sees an answer a failover would lose. If the VM's
host dies, the VM continues on the secondary from the last checkpoint, with
the same boot and memory, and a new secondary is made.`,
		Args:              cobra.ExactArgs(1),
		ValidArgsFunction: completeVMs(g),
		RunE: func(cmd *cobra.Command, args []string) error {
			if interval < 0 {
				return fmt.Errorf("--interval must be positive")
			}
			vm, err := g.client().Protect(cmd.Context(), args[0], api.ProtectRequest{SecondaryHost: secondary, IntervalMS: interval.Milliseconds()})
			if err != nil {
				return err
			}
			return g.printVM(vm)
		},
	}
	cmd.Flags().StringVar(&secondary, "secondary-host", "", "host keeping the standby (default: the scheduler picks one with room)")
	cmd.Flags().DurationVar(&interval, "interval", 0, "time between checkpoints (default 500ms; at least 50ms)")
	return cmd
}

func newVMUnprotectCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:               "unprotect NAME",
		Short:             "Stop keeping a VM's synchronized standby",
		Args:              cobra.ExactArgs(1),
		ValidArgsFunction: completeVMs(g),
		RunE: func(cmd *cobra.Command, args []string) error {
			vm, err := g.client().Unprotect(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			return g.printVM(vm)
		},
	}
}

// printProtection is vm show's protection section.
func printProtection(w io.Writer, p *api.Protection) {
	state := p.State
	if p.Message != "" {
		state += " (" + p.Message + ")"
	}
	row(w, "PROTECTION:", fmt.Sprintf("%s since %s", state, p.Since.Format(time.RFC3339)))
	row(w, "  SECONDARY:", orNone(p.SecondaryHost))
	row(w, "  INTERVAL:", (time.Duration(p.IntervalMS) * time.Millisecond).String())
	if p.LastCheckpoint != nil {
		row(w, "  LAST CHECKPOINT:", fmt.Sprintf("%s (%d committed)", p.LastCheckpoint.Format(time.RFC3339Nano), p.Checkpoints))
	}
	if p.RPOMS > 0 {
		row(w, "  RPO:", fmt.Sprintf("%.0f ms", p.RPOMS))
	}
	if p.Checkpoints > 0 {
		row(w, "  GUEST PAUSE:", fmt.Sprintf("p50 %.1f ms, p99 %.1f ms per checkpoint", p.PauseP50MS, p.PauseP99MS))
		row(w, "  CHECKPOINT:", fmt.Sprintf("%s in %.0f ms", humanSize(p.BytesPerCheckpoint), p.CheckpointMS))
	}
	if p.SecondaryHeardAt != nil {
		row(w, "  SECONDARY HEARD:", fmt.Sprintf("%.1f s ago", time.Since(*p.SecondaryHeardAt).Seconds()))
	}
}
