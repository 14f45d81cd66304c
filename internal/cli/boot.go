package cli

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/agent"
	"github.com/vigil-project/vigil/internal/boothost"
	"github.com/vigil-project/vigil/internal/hostimage"
	"github.com/vigil-project/vigil/internal/pki"
)

func newBootCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "boot", Short: "Stateless hosts: host images, boot profiles, machines that boot from the network"}
	img := &cobra.Command{Use: "image", Short: "Build and list host images"}
	img.AddCommand(newBootImageBuildCmd(g), newBootImageListCmd(g))
	prof := &cobra.Command{Use: "profile", Short: "Boot profiles: which image a machine boots and how it joins"}
	prof.AddCommand(newBootProfileSetCmd(g, "create"), newBootProfileSetCmd(g, "set"), newBootProfileListCmd(g))
	cmd.AddCommand(img, prof, newBootRuleCmd(g), newBootMachinesCmd(g), newBootAdmitCmd(g), newBootQuarantineCmd(g), newBootForgetCmd(g), newBootPowerCmd(g),
		newBootRolloutCmd(g), newBootHostCmd())
	return cmd
}

func newBootImageBuildCmd(g *globals) *cobra.Command {
	var dataDir, out, guest, caFile, vigilBin string
	c := &cobra.Command{
		Use:   "build",
		Short: "Build a host image: kernel, and an initramfs with vigil, QEMU and the cluster CA",
		Long: `Build a host image: Debian's cloud kernel, and an initramfs holding busybox,
this vigil, QEMU with its libraries and firmware, Vigil's built-in guest image
and the cluster CA certificate (the host refuses any configuration not signed
by that CA). The image is named by its sha256 digest; building the same inputs
again gives the same digest. Run it on a manager machine: the image goes to
DATA_DIR/boot/images, where the boot service serves it.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if out == "" {
				out = agent.BootImagesDir(dataDir)
			}
			if guest == "" {
				guest = filepath.Join(dataDir, "images", "default")
			}
			var ca []byte
			if caFile != "" {
				b, err := os.ReadFile(caFile)
				if err != nil {
					return fmt.Errorf("--ca: %w", err)
				}
				ca = b
			} else {
				cfg, err := g.loadConfig()
				if err != nil || cfg.CACert == "" {
					return fmt.Errorf("no cluster CA certificate: give --ca FILE, or a CLI configuration with one (%v)", err)
				}
				ca = []byte(cfg.CACert)
			}
			self := vigilBin
			if self == "" {
				exe, err := os.Executable()
				if err != nil {
					return err
				}
				self = exe
			}
			var progress io.Writer
			if !g.quiet {
				progress = g.errOut
			}
			im, err := hostimage.Build(cmd.Context(), hostimage.Options{Dir: out, CacheDir: filepath.Join(dataDir, "images", "cache"),
				Vigil: self, GuestImage: guest, CACert: ca, Progress: progress})
			if err != nil {
				return err
			}
			if g.quiet {
				fmt.Fprintln(g.out, im.Digest)
				return nil
			}
			return g.printValue(im, func(w io.Writer) {
				row(w, "DIGEST:", im.Digest)
				row(w, "KERNEL:", im.KernelVersion)
				row(w, "QEMU:", im.QEMUVersion)
				row(w, "CA:", im.CAFingerprint)
				row(w, "SIZE:", humanSize(im.Bytes))
				row(w, "DIR:", im.Dir)
			})
		},
	}
	c.Flags().StringVar(&dataDir, "data-dir", envOr("VIGIL_DATA_DIR", agent.DefaultDataDir()), "the manager's data dir (images go to DATA_DIR/boot/images)")
	c.Flags().StringVar(&out, "out", "", "build into this directory instead")
	c.Flags().StringVar(&guest, "guest-image", "", "Vigil's guest image to include (default DATA_DIR/images/default; build it with 'vigil image build')")
	c.Flags().StringVar(&caFile, "ca", "", "the cluster CA certificate (PEM; default: the CLI configuration's)")
	c.Flags().StringVar(&vigilBin, "vigil", "", "the vigil binary hosts run (default: this one)")
	return c
}

func newBootImageListCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use: "list", Aliases: []string{"ls"}, Short: "List host images", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			imgs, err := g.client().BootImages(cmd.Context())
			if err != nil {
				return err
			}
			return g.printValue(imgs, func(w io.Writer) {
				row(w, "DIGEST", "KERNEL", "SIZE", "BUILT")
				for _, i := range imgs {
					row(w, i.Digest, i.KernelVersion, humanSize(i.Bytes), ago(i.BuiltAt))
				}
			})
		},
	}
}

func newBootProfileSetCmd(g *globals, verb string) *cobra.Command {
	var image, pool string
	var labels []string
	c := &cobra.Command{
		Use:   verb + " NAME --image DIGEST",
		Short: map[string]string{"create": "Create a boot profile", "set": "Change a boot profile (machines take it at their next boot)"}[verb],
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			p := api.BootProfile{Name: args[0], Image: image, StoragePool: pool, Labels: map[string]string{}}
			for _, l := range labels {
				k, v, ok := strings.Cut(l, "=")
				if !ok {
					return fmt.Errorf("--label %q: give KEY=VALUE", l)
				}
				p.Labels[k] = v
			}
			p, err := g.client().SetBootProfile(cmd.Context(), p)
			if err != nil {
				return err
			}
			return g.printValue(p, func(w io.Writer) {
				row(w, "PROFILE:", p.Name)
				row(w, "IMAGE:", p.Image)
			})
		},
	}
	c.Flags().StringVar(&image, "image", "", "host image digest (see 'vigil boot image list')")
	c.Flags().StringVar(&pool, "pool", "", "storage pool directory the hosts mount")
	c.Flags().StringSliceVar(&labels, "label", nil, "KEY=VALUE labels of the hosts (repeatable)")
	c.MarkFlagRequired("image")
	return c
}

func newBootProfileListCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use: "list", Aliases: []string{"ls"}, Short: "List boot profiles", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ps, err := g.client().BootProfiles(cmd.Context())
			if err != nil {
				return err
			}
			return g.printValue(ps, func(w io.Writer) {
				row(w, "NAME", "IMAGE", "POOL")
				for _, p := range ps {
					row(w, p.Name, p.Image, orNone(p.StoragePool))
				}
			})
		},
	}
}

func newBootMachinesCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use: "machines", Short: "List the machines that booted from the network, admitted or quarantined", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ms, err := g.client().BootMachines(cmd.Context())
			if err != nil {
				return err
			}
			return g.printValue(ms, func(w io.Writer) {
				row(w, "MAC", "STATE", "HOST", "PROFILE", "BY", "VENDOR", "IP", "BOOTS", "LAST SEEN", "LAST CONFIG", "PROBLEM")
				for _, m := range ms {
					state, by := m.State, "operator"
					if m.Held {
						state += " (held)"
					}
					if m.Rule != "" {
						by = "rule " + m.Rule
					} else if m.State != api.MachineAdmitted {
						by = "-"
					}
					row(w, m.MAC, state, orNone(m.HostName), orNone(m.Profile), by, orNone(m.Vendor), orNone(m.IP), m.Boots, ago(m.LastSeen), orNone(shortDigest(m.LastConfig)), orNone(m.LastError))
				}
			})
		},
	}
}

func shortDigest(d string) string {
	if len(d) > 19 {
		return d[:19]
	}
	return d
}

func newBootAdmitCmd(g *globals) *cobra.Command {
	var profile, host string
	c := &cobra.Command{
		Use:   "admit MAC --profile PROFILE --host-name NAME",
		Short: "Admit a quarantined machine: at its next request it gets its configuration and joins",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			m, err := g.client().AdmitMachine(cmd.Context(), args[0], api.BootAdmitRequest{Profile: profile, HostName: host})
			if err != nil {
				return err
			}
			return g.printValue(m, func(w io.Writer) {
				row(w, "MACHINE:", m.MAC)
				row(w, "STATE:", m.State)
				row(w, "HOST:", m.HostName)
				row(w, "PROFILE:", m.Profile)
			})
		},
	}
	c.Flags().StringVar(&profile, "profile", "", "boot profile")
	c.Flags().StringVar(&host, "host-name", "", "the host name it joins as")
	c.MarkFlagRequired("profile")
	c.MarkFlagRequired("host-name")
	return c
}

func newBootQuarantineCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use: "quarantine MAC", Short: "Take a machine's admission back: from its next boot it gets no configuration", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			m, err := g.client().QuarantineMachine(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			return g.printValue(m, func(w io.Writer) { row(w, "MACHINE:", m.MAC); row(w, "STATE:", m.State) })
		},
	}
}

// newBootHostCmd is what a network-booted host image runs (its init
// starts it): fetch and verify the configuration, then become the host
// agent it describes.
func newBootHostCmd() *cobra.Command {
	return &cobra.Command{
		Use: "host", Short: "Run as a network-booted host (the host image's init runs this)", Hidden: true, Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
			cmdline, err := os.ReadFile("/proc/cmdline")
			if err != nil {
				return err
			}
			p, err := boothost.ParseCmdline(string(cmdline))
			if err != nil {
				return err
			}
			// The image's init brings the network up while this starts.
			if !waitForFile(hostimage.BootAddress, time.Minute) {
				return fmt.Errorf("no address on the boot network after a minute (the image's DHCP client writes %s)", hostimage.BootAddress)
			}
			// The MAC on the command line comes from the boot service's
			// script: the NIC's own address is what counts.
			if ifName, err := os.ReadFile(hostimage.BootInterface); err == nil {
				if hw, err := os.ReadFile(filepath.Join("/sys/class/net", strings.TrimSpace(string(ifName)), "address")); err == nil {
					if nic := strings.TrimSpace(string(hw)); nic != p.MAC {
						return fmt.Errorf("the kernel command line says this machine is %s, its boot interface is %s: not booting on a configuration for another machine", p.MAC, nic)
					}
				}
			}
			dmi := func(f string) string {
				b, _ := os.ReadFile("/sys/class/dmi/id/" + f)
				return strings.TrimSpace(string(b))
			}
			p.UUID, p.Vendor, p.Product = strings.ToLower(dmi("product_uuid")), dmi("sys_vendor"), dmi("product_name")
			caPEM, err := os.ReadFile(hostimage.CAPath)
			if err != nil {
				return fmt.Errorf("this is not a host image (no %s): %w", hostimage.CAPath, err)
			}
			ca, err := pki.ParseCert(caPEM)
			if err != nil {
				return fmt.Errorf("the image's CA certificate: %w", err)
			}
			// The built-in guest's kernel, when it is this one, comes from
			// the boot service while the configuration is fetched.
			kernelDone := make(chan error, 1)
			if sum, err := os.ReadFile(hostimage.GuestKernelSumPath); err == nil {
				if p.KernelURL == "" {
					return fmt.Errorf("the image's guest kernel is the boot service's (%s), but the kernel command line has no vigil.kernel=: boot through Vigil's boot service", hostimage.GuestKernelSumPath)
				}
				go func() {
					kernelDone <- boothost.FetchFile(cmd.Context(), &http.Client{Timeout: 2 * time.Minute}, p.KernelURL, string(sum),
						filepath.Join(hostimage.GuestImageDir, "vmlinuz"))
				}()
			} else {
				kernelDone <- nil
			}
			cfg, signed, err := boothost.NewClient(p, ca, log).Fetch(cmd.Context())
			if err != nil {
				return err
			}
			if err := <-kernelDone; err != nil {
				return fmt.Errorf("the built-in guest's kernel: %w", err)
			}
			addr, err := os.ReadFile(hostimage.BootAddress)
			if err != nil {
				return fmt.Errorf("no address on the boot network (the image's DHCP client writes /run/boot-address): %w", err)
			}
			dataDir := "/run/vigil"
			if err := os.MkdirAll(dataDir, 0o700); err != nil {
				return err
			}
			rec, _ := json.MarshalIndent(map[string]string{"image": p.Image, "config": signed.Digest(), "host": cfg.HostName, "profile": cfg.Profile}, "", "  ")
			os.WriteFile(filepath.Join(dataDir, "boot.json"), rec, 0o600)
			log.Info("boot configuration verified", "host", cfg.HostName, "profile", cfg.Profile, "config", signed.Digest(), "managers", cfg.Managers)
			// The image's init loads the modules the network boot does not
			// need while the configuration is fetched.
			if !waitForFile(hostimage.ModulesReady, 30*time.Second) {
				log.Warn("the host image's modules are still loading after 30s: starting anyway", "file", hostimage.ModulesReady)
			}
			qemuVersion, _ := os.ReadFile(hostimage.QEMUVersionPath)
			// The host agent runs in this process: under TCG a second
			// start of this binary cost about half a second of every boot.
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return agent.RunHost(ctx, agent.HostConfig{Name: cfg.HostName, DataDir: dataDir,
				Listen: net.JoinHostPort(strings.TrimSpace(string(addr)), "7443"), Managers: cfg.Managers,
				JoinToken: cfg.JoinToken, StoragePool: cfg.StoragePool, FenceAfter: agent.DefaultFenceAfter,
				Accel: "auto", QEMUVersion: strings.TrimSpace(string(qemuVersion)), ImageDir: hostimage.GuestImageDir, Logger: log})
		},
	}
}

func newBootForgetCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use: "forget MAC", Short: "Remove a machine's record and address: at its next boot it is unknown (quarantined)", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := g.client().ForgetMachine(cmd.Context(), args[0]); err != nil {
				return err
			}
			if !g.quiet {
				fmt.Fprintf(g.out, "machine %s forgotten\n", args[0])
			}
			return nil
		},
	}
}

func newBootPowerCmd(g *globals) *cobra.Command {
	var qmpSock string
	c := &cobra.Command{
		Use:   "power MAC --qmp SOCKET",
		Short: "Say how the manager resets a machine (for rollouts): a QEMU machine's QMP socket; IPMI and Redfish later",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			power := ""
			if qmpSock != "" {
				abs, err := filepath.Abs(qmpSock)
				if err != nil {
					return err
				}
				power = "qmp:" + abs
			}
			m, err := g.client().SetMachinePower(cmd.Context(), args[0], power)
			if err != nil {
				return err
			}
			return g.printValue(m, func(w io.Writer) { row(w, "MACHINE:", m.MAC); row(w, "POWER:", orNone(m.Power)) })
		},
	}
	c.Flags().StringVar(&qmpSock, "qmp", "", "the machine's QMP socket, on the managers' machine (empty: none)")
	return c
}

func newBootRolloutCmd(g *globals) *cobra.Command {
	var image string
	var timeout time.Duration
	var wait, status bool
	c := &cobra.Command{
		Use:   "rollout PROFILE --image DIGEST [--wait] | rollout PROFILE --status",
		Short: "Move a profile's hosts to another image one at a time, rolling back a host that does not come back",
		Long: `Move the hosts of a profile to another host image, one at a time: the host is
drained (its VMs migrate live), its machine reset through its power control
('vigil boot power'), and the rollout waits until the host is back, registered,
having booted the new image; then it is enabled and the next one goes. A host
not back within --timeout is put back on its previous image and reset again,
and the rollout stops (rolled-back). When every host runs the new image, the
profile names it.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c := g.client()
			var ro api.BootRollout
			var err error
			if status {
				ro, err = c.Rollout(cmd.Context(), args[0])
			} else {
				if image == "" {
					return fmt.Errorf("give --image DIGEST (see 'vigil boot image list'), or --status")
				}
				ro, err = c.StartRollout(cmd.Context(), args[0], api.BootRolloutRequest{Image: image, TimeoutSeconds: int(timeout / time.Second)})
				for err == nil && wait && ro.State == api.RolloutRunning {
					select {
					case <-cmd.Context().Done():
						return cmd.Context().Err()
					case <-time.After(2 * time.Second):
					}
					ro, err = c.Rollout(cmd.Context(), args[0])
				}
			}
			if err != nil {
				return err
			}
			if err := g.printValue(ro, func(w io.Writer) {
				row(w, "PROFILE:", ro.Profile)
				row(w, "FROM:", ro.From)
				row(w, "TO:", ro.To)
				row(w, "STATE:", ro.State)
				if ro.Message != "" {
					row(w, "MESSAGE:", ro.Message)
				}
				row(w, "")
				row(w, "HOST", "MACHINE", "STATE", "PROBLEM")
				for _, h := range ro.Hosts {
					row(w, h.Host, h.MAC, h.State, orNone(h.Error))
				}
			}); err != nil {
				return err
			}
			if ro.State == api.RolloutRolledBack {
				return fmt.Errorf("rollout of %s rolled back: %s", ro.Profile, ro.Message)
			}
			return nil
		},
	}
	c.Flags().StringVar(&image, "image", "", "the host image to move to")
	c.Flags().DurationVar(&timeout, "timeout", 10*time.Minute, "how long a rebooted host may take to be back")
	c.Flags().BoolVar(&wait, "wait", false, "wait until the rollout has ended")
	c.Flags().BoolVar(&status, "status", false, "show the profile's last rollout")
	return c
}

// waitForFile tells whether path exists within d.
func waitForFile(path string, d time.Duration) bool {
	for end := time.Now().Add(d); ; time.Sleep(50 * time.Millisecond) {
		if _, err := os.Stat(path); err == nil {
			return true
		}
		if time.Now().After(end) {
			return false
		}
	}
}
