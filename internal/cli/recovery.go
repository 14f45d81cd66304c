package cli

import (
	"fmt"
	"io"
	"os"
	"slices"
	"time"

	"github.com/spf13/cobra"

	"github.com/vigil-project/vigil/api"
)

// policyFlags are the recovery policy flags shared by create and set.
type policyFlags struct {
	recovery    string
	hangTimeout time.Duration
	minUptime   time.Duration
	maxRestarts int
	window      time.Duration
}

func (f *policyFlags) register(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.recovery, "recovery", "", "what to do when the guest crashes or hangs: restart (default) or none")
	cmd.Flags().DurationVar(&f.hangTimeout, "hang-timeout", 0, "no heartbeats and no activity for this long means hung (default 10s)")
	cmd.Flags().DurationVar(&f.minUptime, "min-uptime", 0, "grace period after a start before a hang can be declared (default 30s)")
	cmd.Flags().IntVar(&f.maxRestarts, "max-restarts", 0, "automatic restarts allowed per --restart-window before the VM goes to failed (default 3)")
	cmd.Flags().DurationVar(&f.window, "restart-window", 0, "window for --max-restarts (default 1h)")
}

// policy applies the flags that were set on top of base.
func (f *policyFlags) policy(cmd *cobra.Command, base api.RecoveryPolicy) (api.RecoveryPolicy, error) {
	p := base
	fl := cmd.Flags()
	if fl.Changed("recovery") {
		p.Recovery = f.recovery
	}
	secs := func(name string, d time.Duration, dst *int) error {
		if !fl.Changed(name) {
			return nil
		}
		if d%time.Second != 0 || d < 0 {
			return fmt.Errorf("--%s %s: give whole seconds, e.g. 10s", name, d)
		}
		*dst = int(d / time.Second)
		return nil
	}
	if err := secs("hang-timeout", f.hangTimeout, &p.HangTimeoutSeconds); err != nil {
		return p, err
	}
	if err := secs("min-uptime", f.minUptime, &p.MinUptimeSeconds); err != nil {
		return p, err
	}
	if err := secs("restart-window", f.window, &p.RestartWindowSeconds); err != nil {
		return p, err
	}
	if fl.Changed("max-restarts") {
		p.MaxRestarts = f.maxRestarts
	}
	return p, nil
}

func newVMSetCmd(g *globals) *cobra.Command {
	var pf policyFlags
	var userData string
	var sshKeys []string
	var eject bool
	cmd := &cobra.Command{
		Use:   "set NAME",
		Short: "Change a VM's crash recovery policy, its cloud-init user-data, or eject its installer CD-ROM",
		Long: `Change a VM's crash recovery policy (at once), its cloud-init user-data
(--user-data or --ssh-key: applied at the next boot, under a new instance id
so cloud-init runs it), or eject its installer CD-ROM (--eject: at once, and
the installed system boots from the disk).`,
		Args:              cobra.ExactArgs(1),
		ValidArgsFunction: completeVMs(g),
		RunE: func(cmd *cobra.Command, args []string) error {
			c := g.client()
			fl := cmd.Flags()
			var cfg api.VMConfigRequest
			if fl.Changed("user-data") {
				b, err := os.ReadFile(userData)
				if err != nil {
					return fmt.Errorf("--user-data: %w", err)
				}
				s := string(b)
				cfg.UserData = &s
			}
			for _, f := range sshKeys {
				keys, err := readSSHKeys(f)
				if err != nil {
					return fmt.Errorf("--ssh-key: %w", err)
				}
				cfg.SSHKeys = append(cfg.SSHKeys, keys...)
			}
			cfg.Eject = eject
			policyChanged := slices.ContainsFunc([]string{"recovery", "hang-timeout", "min-uptime", "max-restarts", "restart-window"}, fl.Changed)
			configChanged := cfg.UserData != nil || len(cfg.SSHKeys) > 0 || cfg.Eject
			if !policyChanged && !configChanged {
				return fmt.Errorf("nothing to change: give a policy flag (--recovery, --hang-timeout, ...), --user-data, --ssh-key or --eject")
			}
			// Check both changes before making either.
			vm, err := c.VM(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			p, err := pf.policy(cmd, vm.Policy)
			if err != nil {
				return err
			}
			if configChanged {
				if vm, err = c.Reconfigure(cmd.Context(), args[0], cfg); err != nil {
					return err
				}
			}
			if policyChanged {
				if vm, err = c.SetPolicy(cmd.Context(), args[0], p); err != nil {
					return err
				}
			}
			return g.printVM(vm)
		},
	}
	pf.register(cmd)
	cmd.Flags().StringVar(&userData, "user-data", "", "new cloud-init user-data file, applied at the next boot")
	cmd.Flags().StringSliceVar(&sshKeys, "ssh-key", nil, "public key file for new user-data that installs it; repeatable")
	cmd.Flags().BoolVar(&eject, "eject", false, "eject the installer CD-ROM: the VM boots from its disk")
	return cmd
}

func newVMIncidentsCmd(g *globals) *cobra.Command {
	var console bool
	cmd := &cobra.Command{
		Use:               "incidents NAME",
		Short:             "List the crashes and hangs Vigil detected in a VM, and what it did",
		Args:              cobra.ExactArgs(1),
		ValidArgsFunction: completeVMs(g),
		RunE: func(cmd *cobra.Command, args []string) error {
			incs, err := g.client().Incidents(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			return g.printValue(incs, func(w io.Writer) {
				row(w, "DETECTED", "KIND", "ACTION", "BACK AFTER", "LAST HEARTBEAT", "EVIDENCE")
				for _, in := range incs {
					back := "-"
					if in.RecoveredAt != nil {
						back = fmt.Sprintf("%.1fs", in.RecoveredInMS/1000)
					}
					hb := "-"
					if in.Evidence.LastHeartbeat != nil {
						hb = in.Evidence.LastHeartbeat.Local().Format(time.TimeOnly)
					}
					ev := in.Evidence.Detail
					if in.Kind == "hang" {
						ev = fmt.Sprintf("silent %.1fs, idle %.1fs, cpu %dms, disk ops %d", in.Evidence.HeartbeatSilenceS, in.Evidence.ActivitySilenceS, in.Evidence.CPUTimeMS, in.Evidence.DiskOps)
					}
					row(w, in.DetectedAt.Local().Format(time.DateTime), in.Kind, in.Action, back, hb, ev)
					for _, e := range in.Timeline {
						fmt.Fprintf(w, "    %s  %-14s %s\n", e.Time.Local().Format("15:04:05.000"), e.Event, e.Detail)
					}
					if console {
						for _, l := range in.Evidence.Console {
							fmt.Fprintln(w, "    | "+l)
						}
					}
				}
			})
		},
	}
	cmd.Flags().BoolVar(&console, "console", false, "show the last console lines captured with each incident")
	return cmd
}

func newVMFaultCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "fault NAME panic|hang|agent-stop|kill",
		Short: "Inject a real fault into a running VM (a recovery drill)",
		Long: `Inject a real fault into a running VM:
  panic       crash the guest kernel (reported by pvpanic)
  hang        crash the guest kernel silently: no panic event, no CPU, no I/O, no heartbeats
  agent-stop  freeze only the guest agent (the guest itself keeps working)
  kill        SIGKILL the QEMU process`,
		Args:              cobra.ExactArgs(2),
		ValidArgsFunction: completeVMs(g),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := g.client().Fault(cmd.Context(), args[0], args[1]); err != nil {
				return err
			}
			if !g.quiet {
				fmt.Fprintf(g.out, "injected %s into %s\n", args[1], args[0])
			}
			return nil
		},
	}
}
