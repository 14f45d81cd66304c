package cli

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"
)

func newEventsCmd(g *globals) *cobra.Command {
	var follow bool
	var vm string
	var since uint64
	cmd := &cobra.Command{
		Use:   "events",
		Short: "Print VM and host lifecycle events (--follow streams them)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := g.client().Events(cmd.Context(), since, vm, follow)
			if err != nil {
				return err
			}
			defer s.Close()
			for {
				e, err := s.Next()
				if errors.Is(err, io.EOF) || cmd.Context().Err() != nil {
					return nil
				}
				if err != nil {
					return err
				}
				if g.output == "json" {
					b, _ := json.Marshal(e)
					fmt.Fprintln(g.out, string(b))
					continue
				}
				line := fmt.Sprintf("%s %-16s", e.Time.Local().Format(time.TimeOnly), e.Type)
				if e.VM != "" {
					line += " vm=" + e.VM
				}
				if e.State != "" {
					line += " state=" + string(e.State)
				}
				if e.Host != "" {
					line += " host=" + e.Host
				}
				if e.Message != "" {
					line += " " + e.Message
				}
				fmt.Fprintln(g.out, line)
			}
		},
	}
	cmd.Flags().BoolVarP(&follow, "follow", "f", false, "keep streaming new events")
	cmd.Flags().StringVar(&vm, "vm", "", "only events of this VM")
	cmd.Flags().Uint64Var(&since, "since", 0, "only events after this sequence number")
	return cmd
}
