package cli

import (
	"fmt"
	"io"
	"sort"
	"time"

	"github.com/spf13/cobra"

	"github.com/vigil-project/vigil/api"
)

func newSnapshotCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "snapshot", Aliases: []string{"snap"}, Short: "Take, list, revert to and delete restore points of a VM"}
	cmd.AddCommand(newSnapshotCreateCmd(g), newSnapshotListCmd(g), newSnapshotRevertCmd(g), newSnapshotDeleteCmd(g))
	return cmd
}

func newSnapshotCreateCmd(g *globals) *cobra.Command {
	var noMemory, noQuiesce bool
	cmd := &cobra.Command{
		Use:               "create VM SNAPSHOT",
		Short:             "Take a snapshot: disk + memory + devices + hardware settings (disk only for a stopped VM)",
		Args:              cobra.ExactArgs(2),
		ValidArgsFunction: completeVMs(g),
		RunE: func(cmd *cobra.Command, args []string) error {
			var s api.Snapshot
			err := g.withProgress(cmd.Context(), args[0], func() (err error) {
				s, err = g.client().CreateSnapshot(cmd.Context(), args[0], api.SnapshotCreateRequest{Name: args[1], NoMemory: noMemory, NoQuiesce: noQuiesce})
				return err
			})
			if err != nil {
				return err
			}
			if g.quiet {
				fmt.Fprintln(g.out, s.Name)
				return nil
			}
			return g.printValue(s, func(w io.Writer) {
				what := "disk only, " + s.Consistency + "-consistent"
				if s.IncludesMemory {
					what = "disk + memory"
				}
				line := fmt.Sprintf("snapshot %s of %s taken (%s)", s.Name, args[0], what)
				if op := s.Operation; op != nil {
					line += fmt.Sprintf(" in %.0f ms", op.DurationMS)
					if op.PausedMS > 0 {
						line += fmt.Sprintf(", guest paused %.1f ms", op.PausedMS)
					}
					if op.FrozenMS > 0 {
						line += fmt.Sprintf(", file systems frozen %.1f ms", op.FrozenMS)
					}
				}
				fmt.Fprintln(w, line)
				if op := s.Operation; op != nil && op.Note != "" && !s.IncludesMemory {
					fmt.Fprintln(w, "note: "+op.Note)
				}
			})
		},
	}
	cmd.Flags().BoolVar(&noMemory, "no-memory", false, "disk only; the guest is not paused, its file systems are frozen through qemu-guest-agent if it answers (else crash-consistent)")
	cmd.Flags().BoolVar(&noQuiesce, "no-quiesce", false, "with --no-memory: do not freeze the guest's file systems (crash-consistent)")
	return cmd
}

func newSnapshotListCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:               "list VM",
		Short:             "Show a VM's snapshots as a tree, with the space each one holds",
		Args:              cobra.ExactArgs(1),
		ValidArgsFunction: completeVMs(g),
		RunE: func(cmd *cobra.Command, args []string) error {
			l, err := g.client().Snapshots(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			if g.quiet {
				for _, s := range l.Snapshots {
					fmt.Fprintln(g.out, s.Name)
				}
				return nil
			}
			if g.output != "table" {
				return g.printValue(l.Snapshots, nil)
			}
			return g.printValue(l, func(w io.Writer) {
				row(w, "SNAPSHOT", "CREATED", "MEMORY", "VM STATE", "SIZE", "")
				for _, line := range snapshotTree(l.Snapshots) {
					s := line.s
					mem := "no"
					if s.IncludesMemory {
						mem = "yes"
					}
					cur := ""
					if s.Current {
						cur = "<- current"
					}
					row(w, line.prefix+s.Name, s.Created.Local().Format(time.DateTime), mem, s.VMState, humanBytes(s.SizeBytes), cur)
				}
				row(w, "", "", "", "total", humanBytes(l.TotalBytes), "")
			})
		},
	}
}

type treeLine struct {
	prefix string
	s      api.Snapshot
}

// snapshotTree orders snapshots depth-first from the roots, with box-drawing
// prefixes that show parent → children. Orphans (a parent that no longer
// exists) are shown as roots.
func snapshotTree(ss []api.Snapshot) []treeLine {
	byName := map[string]bool{}
	for _, s := range ss {
		byName[s.Name] = true
	}
	children := map[string][]api.Snapshot{}
	for _, s := range ss {
		p := s.Parent
		if !byName[p] {
			p = ""
		}
		children[p] = append(children[p], s)
	}
	for _, c := range children {
		sort.Slice(c, func(i, j int) bool { return c[i].Created.Before(c[j].Created) })
	}
	var out []treeLine
	var walk func(parent, indent string)
	walk = func(parent, indent string) {
		kids := children[parent]
		for i, s := range kids {
			last := i == len(kids)-1
			branch, next := "├─ ", "│  "
			if last {
				branch, next = "└─ ", "   "
			}
			if parent == "" {
				branch, next = "", ""
			}
			out = append(out, treeLine{prefix: indent + branch, s: s})
			walk(s.Name, indent+next)
		}
	}
	walk("", "")
	return out
}

func humanBytes(b int64) string {
	switch {
	case b >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(b)/(1<<30))
	case b >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20))
	case b >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(b)/(1<<10))
	}
	return fmt.Sprintf("%d B", b)
}

func newSnapshotRevertCmd(g *globals) *cobra.Command {
	var wait bool
	cmd := &cobra.Command{
		Use:               "revert VM SNAPSHOT",
		Short:             "Return a VM to a snapshot (running from that instant if it holds memory); its current state is discarded",
		Args:              cobra.ExactArgs(2),
		ValidArgsFunction: completeVMs(g),
		RunE: func(cmd *cobra.Command, args []string) error {
			c := g.client()
			var vm api.VM
			err := g.withProgress(cmd.Context(), args[0], func() (err error) {
				vm, err = c.RevertSnapshot(cmd.Context(), args[0], args[1])
				return err
			})
			if err != nil {
				return err
			}
			if wait && vm.State == api.StateRunning {
				if vm, err = c.WaitGuest(cmd.Context(), vm.Name); err != nil {
					return err
				}
			}
			return g.printVM(vm)
		},
	}
	cmd.Flags().BoolVar(&wait, "wait", false, "wait for a guest agent heartbeat after reverting to a running snapshot")
	return cmd
}

func newSnapshotDeleteCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:               "delete VM SNAPSHOT",
		Short:             "Delete a snapshot; its children stay valid",
		Args:              cobra.ExactArgs(2),
		ValidArgsFunction: completeVMs(g),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := g.client().DeleteSnapshot(cmd.Context(), args[0], args[1]); err != nil {
				return err
			}
			if !g.quiet {
				fmt.Fprintf(g.out, "deleted snapshot %s of %s\n", args[1], args[0])
			}
			return nil
		},
	}
}
