// Package cli implements the vigil command line: one file per noun.
package cli

import (
	"context"
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"

	"github.com/vigil-project/vigil/client"
)

// globals are the persistent flags every command shares.
type globals struct {
	addr   string
	output string
	quiet  bool
	out    io.Writer
	errOut io.Writer
}

func (g *globals) client() *client.Client { return client.New(g.addr) }

// NewRoot builds the vigil command tree.
func NewRoot() *cobra.Command {
	g := &globals{}
	root := &cobra.Command{
		Use:           "vigil",
		Short:         "Vigil runs virtual servers on QEMU and keeps them alive and their state safe",
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, args []string) error {
			g.out, g.errOut = cmd.OutOrStdout(), cmd.ErrOrStderr()
			switch g.output {
			case "table", "json", "yaml":
			default:
				return fmt.Errorf("unknown output format %q: use table, json or yaml", g.output)
			}
			return nil
		},
	}
	addr := os.Getenv("VIGIL_ADDR")
	if addr == "" {
		addr = client.DefaultAddr
	}
	root.PersistentFlags().StringVar(&g.addr, "addr", addr, "address of the vigil API (env VIGIL_ADDR)")
	root.PersistentFlags().StringVarP(&g.output, "output", "o", "table", "output format: table, json or yaml")
	root.PersistentFlags().BoolVarP(&g.quiet, "quiet", "q", false, "print only what scripts need")
	root.AddCommand(newVMCmd(g), newSnapshotCmd(g), newHostCmd(g), newEventsCmd(g), newImageCmd(g), newAgentCmd(g))
	return root
}

// Main runs the CLI and returns the process exit code. Errors are printed as
// one line: what went wrong and what to do.
func Main(ctx context.Context, args []string) int {
	root := NewRoot()
	root.SetArgs(args)
	if err := root.ExecuteContext(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "vigil: "+err.Error())
		return 1
	}
	return 0
}
