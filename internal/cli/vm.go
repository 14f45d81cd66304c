package cli

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/client"
	"github.com/vigil-project/vigil/internal/hostproto"
)

func newVMCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "vm", Short: "Create, run and inspect virtual servers"}
	cmd.AddCommand(newVMCreateCmd(g), newVMListCmd(g), newVMShowCmd(g),
		newVMStateCmd(g, api.ActionStart, "Start a stopped VM"),
		newVMStateCmd(g, api.ActionStop, "Stop a VM: ACPI power-down, killed after --timeout"),
		newVMStateCmd(g, api.ActionRestart, "Stop (if running) and start a VM: a fresh boot"),
		newVMPauseCmd(g), newVMResumeCmd(g), newVMExecCmd(g),
		newVMIncidentsCmd(g), newVMFaultCmd(g), newVMSetCmd(g),
		newVMDeleteCmd(g), newVMConsoleCmd(g), newVMScreenshotCmd(g), newVMMigrateCmd(g),
		newVMProtectCmd(g), newVMUnprotectCmd(g))
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
	var host, image, iso, userData, firmware string
	var sshKeys, networks, publish []string
	var pf policyFlags
	cmd := &cobra.Command{
		Use:   "create NAME",
		Short: "Create a VM: the built-in guest, an imported OS image (--image) or an installer (--iso)",
		Long: `Create a VM.

Without --image or --iso the VM boots Vigil's built-in guest with an empty
data disk (128M of memory, a 256M disk). With --image it boots an imported
disk image from a copy-on-write overlay grown to --disk (default: the
image's size; 1G of memory), configured by cloud-init from --user-data or
--ssh-key. With --iso it boots an imported installer ISO from a CD-ROM with
an empty --disk (default 8G; 1G of memory).`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			osGuest := image != "" || iso != ""
			if image != "" && iso != "" {
				return fmt.Errorf("--image and --iso exclude each other: boot an image, or install from an ISO onto an empty disk")
			}
			if !osGuest && (userData != "" || len(sshKeys) > 0 || firmware != "") {
				return fmt.Errorf("--user-data, --ssh-key and --firmware apply to VMs from --image or --iso: the built-in guest has no cloud-init or firmware choice")
			}
			if !cmd.Flags().Changed("memory") && osGuest {
				memory = "1G"
			}
			switch {
			case cmd.Flags().Changed("disk"):
			case image != "":
				disk = "0"
			case iso != "":
				disk = "8G"
			}
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
			req := api.VMCreateRequest{Name: args[0], MemoryBytes: mem, CPUs: cpus, DiskBytes: dsk, Start: start, Host: host,
				Image: image, ISO: iso, Firmware: firmware}
			for _, n := range networks {
				nic, err := parseNIC(n)
				if err != nil {
					return err
				}
				req.NICs = append(req.NICs, nic)
			}
			for _, p := range publish {
				pp, err := parsePublish(p)
				if err != nil {
					return err
				}
				req.Publish = append(req.Publish, pp)
			}
			if userData != "" {
				b, err := os.ReadFile(userData)
				if err != nil {
					return fmt.Errorf("--user-data: %w", err)
				}
				req.UserData = string(b)
			}
			for _, f := range sshKeys {
				keys, err := readSSHKeys(f)
				if err != nil {
					return fmt.Errorf("--ssh-key: %w", err)
				}
				req.SSHKeys = append(req.SSHKeys, keys...)
			}
			c := g.client()
			policy, err := pf.policy(cmd, api.RecoveryPolicy{})
			if err != nil {
				return err
			}
			req.Policy = &policy
			vm, err := c.CreateVM(cmd.Context(), req)
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
	cmd.Flags().StringVar(&memory, "memory", "128M", "memory, e.g. 128M or 1G (1G with --image or --iso)")
	cmd.Flags().IntVar(&cpus, "cpus", 1, "virtual CPUs")
	cmd.Flags().StringVar(&disk, "disk", "256M", "disk size (qcow2, allocated as used); with --image the image's size, with --iso 8G")
	cmd.Flags().BoolVar(&start, "start", false, "start the VM once it is created")
	cmd.Flags().BoolVar(&wait, "wait", false, "with --start: wait until the guest's agent (vigil-guest or qemu-guest-agent) answers")
	cmd.Flags().StringVar(&host, "host", "", "place the VM on this host (default: the scheduler picks one with room)")
	cmd.Flags().StringVar(&image, "image", "", "boot this imported disk image (see 'vigil image import')")
	cmd.Flags().StringVar(&iso, "iso", "", "boot this imported installer ISO from a CD-ROM, with an empty disk")
	cmd.Flags().StringVar(&userData, "user-data", "", "cloud-init user-data file for the guest")
	cmd.Flags().StringSliceVar(&sshKeys, "ssh-key", nil, "public key file (e.g. ~/.ssh/id_ed25519.pub) installed by cloud-init; repeatable")
	cmd.Flags().StringVar(&firmware, "firmware", "", "bios (default) or uefi (OVMF, with per-VM variables)")
	cmd.Flags().StringArrayVar(&networks, "network", nil, "NAME[,ip=ADDR][,mac=MAC]: a NIC on this network; repeatable (default: network 'default' if it exists, else user-mode; 'user' names user-mode)")
	cmd.Flags().StringArrayVar(&publish, "publish", nil, "HOSTPORT:GUESTPORT[/udp]: forward this port of the VM's host to the VM; repeatable")
	pf.register(cmd)
	return cmd
}

// readSSHKeys returns the public keys of an authorized_keys-style file,
// skipping blank lines and comments; the API checks each key.
func readSSHKeys(path string) ([]string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var keys []string
	for _, l := range strings.Split(string(b), "\n") {
		if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "#") {
			keys = append(keys, l)
		}
	}
	if len(keys) == 0 {
		return nil, fmt.Errorf("%s holds no public key", path)
	}
	return keys, nil
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
		switch {
		case vm.Image != "":
			row(w, "IMAGE:", vm.Image)
		case vm.ISO != "":
			row(w, "ISO:", vm.ISO)
		default:
			row(w, "IMAGE:", "built-in guest")
		}
		if vm.Firmware != "" {
			row(w, "FIRMWARE:", vm.Firmware)
		}
		if vm.Endpoint != "" {
			row(w, "ENDPOINT:", "http://"+vm.Endpoint)
		} else {
			row(w, "ENDPOINT:", "- (the address comes from your network's DHCP: see GUEST ADDRESSES)")
		}
		if len(vm.NICs) == 0 {
			row(w, "NETWORK:", "user-mode (QEMU's own; reached through the endpoint)")
		}
		for i, n := range vm.NICs {
			row(w, fmt.Sprintf("NIC %d:", i), fmt.Sprintf("network %s, mac %s, ip %s", n.Network, n.MAC, orNone(n.IP)))
		}
		for _, p := range vm.Publish {
			proto := p.Proto
			if proto == "" {
				proto = "tcp"
			}
			row(w, "PUBLISHED:", fmt.Sprintf("host port %d/%s -> guest port %d", p.HostPort, proto, p.GuestPort))
		}
		row(w, "CREATED:", vm.CreatedAt.Format(time.RFC3339))
		p := vm.Policy
		row(w, "RECOVERY:", fmt.Sprintf("%s (hang after %ds, min uptime %ds, at most %d restarts per %ds)", p.Recovery, p.HangTimeoutSeconds, p.MinUptimeSeconds, p.MaxRestarts, p.RestartWindowSeconds))
		if vm.Condition != "" {
			row(w, "CONDITION:", vm.Condition)
		}
		if vm.CurrentSnapshot != "" {
			row(w, "SNAPSHOT:", vm.CurrentSnapshot)
		}
		if pr := vm.Protection; pr != nil {
			printProtection(w, pr)
		}
		if op := vm.LastOperation; op != nil {
			line := op.Action
			if op.DurationMS > 0 { // 0: not known when it was recorded
				line += fmt.Sprintf(" in %.1f ms", op.DurationMS)
			}
			if op.PausedMS > 0 {
				line += fmt.Sprintf(", guest paused %.1f ms", op.PausedMS)
			}
			if op.Bytes > 0 {
				line += ", " + humanSize(op.Bytes)
			}
			row(w, "LAST OPERATION:", line)
		}
		if gi := vm.Guest; gi != nil {
			if gi.Agent != "" {
				row(w, "GUEST AGENT:", gi.Agent)
			}
			if gi.OS != "" {
				row(w, "GUEST OS:", gi.OS)
			}
			if gi.Hostname != "" {
				row(w, "GUEST HOSTNAME:", gi.Hostname)
			}
			if len(gi.Addresses) > 0 {
				row(w, "GUEST ADDRESSES:", strings.Join(gi.Addresses, ", "))
			}
			row(w, "GUEST BOOT ID:", gi.BootID)
			row(w, "GUEST SEQ:", gi.Seq)
			row(w, "GUEST UPTIME:", fmt.Sprintf("%.1fs", gi.UptimeSeconds))
			if gi.Agent != "qemu-ga" {
				// qemu-guest-agent does not tell these.
				row(w, "GUEST LOAD:", fmt.Sprintf("%.2f", gi.Load1))
				row(w, "GUEST MEMORY USED:", humanSize(int64(gi.MemUsedBytes)))
			}
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
	var opts client.ListOptions
	cmd := &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "List VMs (--host, --state to narrow; read a page at a time)",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			vms, err := g.client().AllVMs(cmd.Context(), opts)
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
	cmd.Flags().StringVar(&opts.Host, "host", "", "only the VMs placed on this host")
	cmd.Flags().StringVar(&opts.State, "state", "", "only the VMs in this state (running, stopped, paused, suspended, failed...)")
	cmd.Flags().IntVar(&opts.Limit, "page-size", 500, "VMs asked for per request (1-1000)")
	return cmd
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
	var follow, vnc bool
	var listen string
	cmd := &cobra.Command{
		Use:   "console NAME",
		Short: "Print the VM's serial console (--follow streams it), or serve its screen over VNC (--vnc)",
		Long: `Print the VM's serial console (--follow streams it).

With --vnc, serve the VM's graphical console on a local VNC port (default
127.0.0.1:5901) until interrupted: each VNC client that connects is
tunnelled through the authenticated API to QEMU's VNC server, which listens
on a unix socket on the VM's host and never on a TCP port. Point any VNC
viewer at the port (e.g. 'vncviewer 127.0.0.1:5901').`,
		Args:              cobra.ExactArgs(1),
		ValidArgsFunction: completeVMs(g),
		RunE: func(cmd *cobra.Command, args []string) error {
			if !vnc {
				if cmd.Flags().Changed("listen") {
					return fmt.Errorf("--listen goes with --vnc")
				}
				return g.client().Console(cmd.Context(), args[0], follow, g.out)
			}
			if follow {
				return fmt.Errorf("--follow is for the serial console, not --vnc")
			}
			return g.serveVNC(cmd.Context(), args[0], listen)
		},
	}
	cmd.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing new console output")
	cmd.Flags().BoolVar(&vnc, "vnc", false, "serve the VM's graphical console on a local VNC port")
	cmd.Flags().StringVar(&listen, "listen", "127.0.0.1:5901", "with --vnc: the local address to serve VNC on")
	return cmd
}

// serveVNC accepts VNC clients on listen and tunnels each to the VM's
// screen until ctx ends.
func (g *globals) serveVNC(ctx context.Context, vm, listen string) error {
	c := g.client()
	// Fail now, not at the first viewer, if the VM has no screen or the
	// caller may not see it.
	probe, err := c.VNC(ctx, vm)
	if err != nil {
		return err
	}
	probe.Close()
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return fmt.Errorf("--listen: %w", err)
	}
	defer ln.Close()
	context.AfterFunc(ctx, func() { ln.Close() })
	if !g.quiet {
		fmt.Fprintf(g.errOut, "VNC console of %s on %s (tunnelled through the vigil api); Ctrl-C to stop\n", vm, ln.Addr())
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("accept a vnc client: %w", err)
		}
		wg.Go(func() {
			defer conn.Close()
			stop := context.AfterFunc(ctx, func() { conn.Close() })
			defer stop()
			t, err := c.VNC(ctx, vm)
			if err != nil {
				fmt.Fprintf(g.errOut, "vnc client %s: %v\n", conn.RemoteAddr(), err)
				return
			}
			hostproto.Pipe(conn, t)
		})
	}
}

func newVMScreenshotCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:               "screenshot NAME FILE.png",
		Short:             "Save a PNG of the VM's screen",
		Args:              cobra.ExactArgs(2),
		ValidArgsFunction: completeVMs(g),
		RunE: func(cmd *cobra.Command, args []string) error {
			png, err := g.client().Screenshot(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			if err := os.WriteFile(args[1], png, 0o644); err != nil {
				return fmt.Errorf("save the screenshot: %w", err)
			}
			if !g.quiet && g.output == "table" {
				fmt.Fprintf(g.errOut, "saved %s (%s)\n", args[1], humanSize(int64(len(png))))
			}
			return nil
		},
	}
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
