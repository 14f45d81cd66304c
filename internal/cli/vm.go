package cli

import (
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/vigil-project/vigil/api"
)

func newVMCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "vm", Short: "Create, run and inspect virtual servers"}
	cmd.AddCommand(newVMCreateCmd(g), newVMListCmd(g), newVMShowCmd(g),
		newVMStateCmd(g, api.ActionStart, "Start a stopped VM"),
		newVMStateCmd(g, api.ActionStop, "Stop a VM: ACPI power-down, killed after --timeout"),
		newVMStateCmd(g, api.ActionRestart, "Stop (if running) and start a VM: a fresh boot"),
		newVMPauseCmd(g), newVMResumeCmd(g), newVMExecCmd(g),
		newVMIncidentsCmd(g), newVMFaultCmd(g), newVMSetCmd(g),
		newVMDeleteCmd(g), newVMConsoleCmd(g), newVMMigrateCmd(g))
	return cmd
}

// completeVMs offers the names of existing VMs, asked of the API.
func completeVMs(g *globals) func(*cobra.Command, []string, string) ([]string, cobra.ShellCompDirective) {
	return func(cmd *cobra.Command, args []string, _ string) ([]string, cobra.ShellCompDirective) {
		if len(args) > 0 {
			return nil, cobra.ShellCompDirectiveNoFileComp
		}
		vms, err := g.client().VMs(cmd.Context())
		if err != nil {
			return nil, cobra.ShellCompDirectiveNoFileComp
		}
		names := make([]string, len(vms))
		for i, v := range vms {
			names[i] = v.Name
		}
		return names, cobra.ShellCompDirectiveNoFileComp
	}
}

func newVMCreateCmd(g *globals) *cobra.Command {
	var memory, disk string
	var cpus int
	var start, wait bool
	var host string
	var pf policyFlags
	cmd := &cobra.Command{
		Use:   "create NAME",
		Short: "Create a VM with a fresh disk, booting the default guest image",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			mem, err := parseSize(memory)
			if err != nil {
				return fmt.Errorf("--memory: %w", err)
			}
			dsk, err := parseSize(disk)
			if err != nil {
				return fmt.Errorf("--disk: %w", err)
			}
			if wait && !start {
				return fmt.Errorf("--wait needs --start: a VM that is not started has no guest to wait for")
			}
			c := g.client()
			policy, err := pf.policy(cmd, api.RecoveryPolicy{})
			if err != nil {
				return err
			}
			vm, err := c.CreateVM(cmd.Context(), api.VMCreateRequest{Name: args[0], MemoryBytes: mem, CPUs: cpus, DiskBytes: dsk, Start: start, Policy: &policy, Host: host})
			if err != nil {
				return err
			}
			if wait {
				if !g.quiet && g.output == "table" {
					fmt.Fprintf(g.errOut, "waiting for the guest agent of %s...\n", vm.Name)
				}
				if vm, err = c.WaitGuest(cmd.Context(), vm.Name); err != nil {
					return err
				}
			}
			return g.printVM(vm)
		},
	}
	cmd.Flags().StringVar(&memory, "memory", "128M", "memory, e.g. 128M or 1G")
	cmd.Flags().IntVar(&cpus, "cpus", 1, "virtual CPUs")
	cmd.Flags().StringVar(&disk, "disk", "256M", "data disk size (qcow2, allocated as used)")
	cmd.Flags().BoolVar(&start, "start", false, "start the VM once it is created")
	cmd.Flags().BoolVar(&wait, "wait", false, "with --start: wait for the guest agent's first heartbeat")
	cmd.Flags().StringVar(&host, "host", "", "place the VM on this host (default: the scheduler picks one with room)")
	pf.register(cmd)
	return cmd
}

func (g *globals) printVM(vm api.VM) error {
	if g.quiet {
		fmt.Fprintln(g.out, vm.Name)
		return nil
	}
	return g.printValue(vm, func(w io.Writer) {
		row(w, "NAME:", vm.Name)
		row(w, "STATE:", vm.State)
		if vm.Message != "" {
			row(w, "MESSAGE:", vm.Message)
		}
		row(w, "HOST:", vm.Host)
		if vm.StoragePool != "" {
			row(w, "STORAGE:", "pool "+vm.StoragePool+" (can move to any host of the pool)")
		} else {
			row(w, "STORAGE:", "local to "+vm.Host)
		}
		row(w, "PID:", orDash(vm.PID))
		row(w, "CPUS:", vm.CPUs)
		row(w, "MEMORY:", humanSize(vm.MemoryBytes))
		row(w, "DISK:", humanSize(vm.DiskBytes))
		row(w, "ENDPOINT:", "http://"+vm.Endpoint)
		row(w, "CREATED:", vm.CreatedAt.Format(time.RFC3339))
		p := vm.Policy
		row(w, "RECOVERY:", fmt.Sprintf("%s (hang after %ds, min uptime %ds, at most %d restarts per %ds)", p.Recovery, p.HangTimeoutSeconds, p.MinUptimeSeconds, p.MaxRestarts, p.RestartWindowSeconds))
		if vm.Condition != "" {
			row(w, "CONDITION:", vm.Condition)
		}
		if vm.CurrentSnapshot != "" {
			row(w, "SNAPSHOT:", vm.CurrentSnapshot)
		}
		if op := vm.LastOperation; op != nil {
			line := fmt.Sprintf("%s in %.1f ms", op.Action, op.DurationMS)
			if op.PausedMS > 0 {
				line += fmt.Sprintf(", guest paused %.1f ms", op.PausedMS)
			}
			if op.Bytes > 0 {
				line += ", " + humanSize(op.Bytes)
			}
			row(w, "LAST OPERATION:", line)
		}
		if gi := vm.Guest; gi != nil {
			row(w, "GUEST BOOT ID:", gi.BootID)
			row(w, "GUEST SEQ:", gi.Seq)
			row(w, "GUEST UPTIME:", fmt.Sprintf("%.1fs", gi.UptimeSeconds))
			row(w, "GUEST LOAD:", fmt.Sprintf("%.2f", gi.Load1))
			row(w, "GUEST MEMORY USED:", humanSize(int64(gi.MemUsedBytes)))
			row(w, "LAST HEARTBEAT:", gi.LastHeartbeat.Format(time.RFC3339)+" ("+ago(gi.LastHeartbeat)+")")
		} else {
			row(w, "GUEST:", "no heartbeat yet")
		}
	})
}

func orDash(n int) string {
	if n == 0 {
		return "-"
	}
	return fmt.Sprint(n)
}

func newVMListCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "List VMs",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			vms, err := g.client().VMs(cmd.Context())
			if err != nil {
				return err
			}
			if g.quiet {
				for _, v := range vms {
					fmt.Fprintln(g.out, v.Name)
				}
				return nil
			}
			return g.printValue(vms, func(w io.Writer) {
				row(w, "NAME", "STATE", "HOST", "CPUS", "MEMORY", "DISK", "PID", "ENDPOINT", "HEARTBEAT")
				for _, v := range vms {
					hb := "-"
					if v.Guest != nil {
						hb = ago(v.Guest.LastHeartbeat)
					}
					row(w, v.Name, v.State, v.Host, v.CPUs, humanSize(v.MemoryBytes), humanSize(v.DiskBytes), orDash(v.PID), v.Endpoint, hb)
				}
			})
		},
	}
}

func newVMShowCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:               "show NAME",
		Short:             "Show one VM, with what its guest agent last reported",
		Args:              cobra.ExactArgs(1),
		ValidArgsFunction: completeVMs(g),
		RunE: func(cmd *cobra.Command, args []string) error {
			vm, err := g.client().VM(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			return g.printVM(vm)
		},
	}
}

func newVMStateCmd(g *globals, action api.Action, short string) *cobra.Command {
	var timeout time.Duration
	var force, wait bool
	cmd := &cobra.Command{
		Use:               string(action) + " NAME",
		Short:             short,
		Args:              cobra.ExactArgs(1),
		ValidArgsFunction: completeVMs(g),
		RunE: func(cmd *cobra.Command, args []string) error {
			req := api.VMStateRequest{Action: action, Force: force}
			if timeout > 0 {
				req.TimeoutSeconds = int((timeout + time.Second - 1) / time.Second)
			}
			return g.changeState(cmd, args[0], req, wait)
		},
	}
	if action != api.ActionStart {
		cmd.Flags().DurationVar(&timeout, "timeout", 30*time.Second, "how long the guest may take to power down before it is killed")
		cmd.Flags().BoolVar(&force, "force", false, "kill the VM at once instead of asking the guest to power down")
	}
	if action != api.ActionStop {
		cmd.Flags().BoolVar(&wait, "wait", false, "wait for the guest agent's first heartbeat")
	}
	return cmd
}

// changeState asks for a state change (showing progress of long saves and
// restores), optionally waits for the guest agent, and prints the VM.
func (g *globals) changeState(cmd *cobra.Command, name string, req api.VMStateRequest, wait bool) error {
	c := g.client()
	var vm api.VM
	err := g.withProgress(cmd.Context(), name, func() (err error) {
		vm, err = c.ChangeState(cmd.Context(), name, req)
		return err
	})
	if err != nil {
		return err
	}
	if wait {
		if vm, err = c.WaitGuest(cmd.Context(), vm.Name); err != nil {
			return err
		}
	}
	return g.printVM(vm)
}

func newVMPauseCmd(g *globals) *cobra.Command {
	var toDisk bool
	cmd := &cobra.Command{
		Use:               "pause NAME",
		Short:             "Pause a VM in memory, or with --to-disk save its whole state to a file and free the host",
		Args:              cobra.ExactArgs(1),
		ValidArgsFunction: completeVMs(g),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.changeState(cmd, args[0], api.VMStateRequest{Action: api.ActionPause, ToDisk: toDisk}, false)
		},
	}
	cmd.Flags().BoolVar(&toDisk, "to-disk", false, "save memory, devices and CPU state to a state file and end QEMU (state suspended)")
	return cmd
}

func newVMResumeCmd(g *globals) *cobra.Command {
	var discard, wait bool
	cmd := &cobra.Command{
		Use:               "resume NAME",
		Short:             "Continue a paused VM, or restore a suspended one from its state file",
		Args:              cobra.ExactArgs(1),
		ValidArgsFunction: completeVMs(g),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.changeState(cmd, args[0], api.VMStateRequest{Action: api.ActionResume, DiscardState: discard}, wait)
		},
	}
	cmd.Flags().BoolVar(&discard, "discard-state", false, "delete the saved state and cold-boot from the disk instead")
	cmd.Flags().BoolVar(&wait, "wait", false, "wait for a guest agent heartbeat")
	return cmd
}

func newVMDeleteCmd(g *globals) *cobra.Command {
	var force bool
	cmd := &cobra.Command{
		Use:               "delete NAME",
		Aliases:           []string{"rm"},
		Short:             "Delete a VM: stops it at once and removes its disk and files",
		Args:              cobra.ExactArgs(1),
		ValidArgsFunction: completeVMs(g),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := g.client().DeleteVM(cmd.Context(), args[0], force); err != nil {
				return err
			}
			if !g.quiet {
				fmt.Fprintf(g.out, "deleted %s\n", args[0])
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&force, "force", false, "also delete the VM's snapshots")
	return cmd
}

func newVMConsoleCmd(g *globals) *cobra.Command {
	var follow bool
	cmd := &cobra.Command{
		Use:               "console NAME",
		Short:             "Print the VM's serial console (--follow streams it)",
		Args:              cobra.ExactArgs(1),
		ValidArgsFunction: completeVMs(g),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.client().Console(cmd.Context(), args[0], follow, g.out)
		},
	}
	cmd.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing new console output")
	return cmd
}

func newVMExecCmd(g *globals) *cobra.Command {
	var timeout time.Duration
	var background bool
	cmd := &cobra.Command{
		Use:               "exec NAME -- COMMAND...",
		Short:             "Run a shell command in the guest through its guest agent",
		Args:              cobra.MinimumNArgs(2),
		ValidArgsFunction: completeVMs(g),
		RunE: func(cmd *cobra.Command, args []string) error {
			req := api.ExecRequest{Command: strings.Join(args[1:], " "), Background: background, TimeoutSeconds: int(timeout / time.Second)}
			res, err := g.client().Exec(cmd.Context(), args[0], req)
			if err != nil {
				return err
			}
			if g.output != "table" {
				return g.printValue(res, nil)
			}
			fmt.Fprint(g.out, res.Output)
			if res.Error != "" {
				return fmt.Errorf("in the guest: %s", res.Error)
			}
			if res.ExitCode != 0 {
				return fmt.Errorf("the command exited with status %d in the guest", res.ExitCode)
			}
			return nil
		},
	}
	cmd.Flags().DurationVar(&timeout, "timeout", 30*time.Second, "how long the command may run")
	cmd.Flags().BoolVar(&background, "background", false, "start the command detached and return at once")
	return cmd
}
