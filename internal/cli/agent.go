package cli

import (
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/vigil-project/vigil/client"
	"github.com/vigil-project/vigil/internal/agent"
	"github.com/vigil-project/vigil/internal/manager"
)

func newAgentCmd(g *globals) *cobra.Command {
	var cfg agent.DevConfig
	var dev, isHost, bootOnly bool
	var logLevel, managerFlag, managers, joinToken, etcdEndpoints, etcdPeers, storagePool string
	var fenceAfter, deadAfter, certTTL time.Duration
	var etcdCA, etcdCert, etcdKey string
	var boot agent.BootConfig
	var oc manager.Overcommit
	cmd := &cobra.Command{
		Use:   "agent",
		Short: "Run a Vigil agent: --dev (all in one), --manager, --host, or --boot",
		Long: `Run a Vigil agent.
  --dev      manager, embedded etcd and one host agent in one process (a laptop, CI)
  --manager  a manager: API and controllers, with an embedded etcd or --etcd-endpoints
  --host     a host agent that joins a manager: --name, --manager URL[,URL...], --join-token
  --boot     a boot service alone (DHCP, iPXE, signed configurations) on the cluster's
             store: --etcd-endpoints, --boot-interface, --boot-manager-url`,
		Args: cobra.ArbitraryArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			// --manager is the manager mode on its own, and with --host it
			// takes the manager URLs ("--manager URL" or "--manager=URL").
			isManager := cmd.Flags().Changed("manager") && !isHost
			if isHost && cmd.Flags().Changed("manager") {
				if managerFlag != noValue {
					managers = managerFlag
				} else if len(args) == 1 {
					managers, args = args[0], nil
				}
			}
			if len(args) > 0 {
				return fmt.Errorf("unexpected arguments %v", args)
			}
			modes := 0
			for _, b := range []bool{dev, isManager, isHost, bootOnly} {
				if b {
					modes++
				}
			}
			if modes != 1 {
				return fmt.Errorf("choose one of --dev, --manager, --host or --boot")
			}
			var lvl slog.Level
			if err := lvl.UnmarshalText([]byte(logLevel)); err != nil {
				return fmt.Errorf("--log-level %q: use debug, info, warn or error", logLevel)
			}
			log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			progress := func(s string) { fmt.Fprint(os.Stderr, s) }
			if oc.Memory <= 0 || oc.Memory > 4 || oc.CPU <= 0 || oc.CPU > 64 {
				return fmt.Errorf("--memory-overcommit %g / --cpu-overcommit %g out of range: use 0 < memory ≤ 4 and 0 < cpu ≤ 64 (1.0 promises exactly what a host has)", oc.Memory, oc.CPU)
			}
			switch {
			case isManager:
				peers := map[string]string{}
				for _, p := range splitList(etcdPeers) {
					name, u, ok := strings.Cut(p, "=")
					if !ok || name == "" || u == "" {
						return fmt.Errorf("--etcd-peers %q: give name=http://HOST:PORT for every manager, comma-separated", p)
					}
					peers[name] = u
				}
				if len(peers) > 0 && cfg.HostName == "" {
					return fmt.Errorf("--etcd-peers needs --name: this manager's name among the peers")
				}
				if len(peers) > 0 && etcdEndpoints != "" {
					return fmt.Errorf("use either --etcd-peers (embedded cluster) or --etcd-endpoints (external etcd), not both")
				}
				if certTTL < 10*time.Minute {
					return fmt.Errorf("--cert-ttl %s is too short: hosts renew at half-life and must survive a manager outage; use at least 10m", certTTL)
				}
				return agent.RunManager(ctx, agent.ManagerConfig{Overcommit: oc, Listen: cfg.Listen, DataDir: cfg.DataDir, Name: cfg.HostName,
					EtcdEndpoints: splitList(etcdEndpoints), EtcdPeers: peers, Logger: log, HostDeadAfter: deadAfter, CertTTL: certTTL,
					EtcdTLS: agent.EtcdTLS{CA: etcdCA, Cert: etcdCert, Key: etcdKey}, Boot: &boot})
			case bootOnly:
				return agent.RunBoot(ctx, agent.BootOnlyConfig{Name: cfg.HostName, DataDir: cfg.DataDir, EtcdEndpoints: splitList(etcdEndpoints),
					EtcdTLS: agent.EtcdTLS{CA: etcdCA, Cert: etcdCert, Key: etcdKey}, Boot: boot, CertTTL: certTTL, Logger: log})
			case isHost:
				if cfg.HostName == "" {
					return fmt.Errorf("--host needs --name")
				}
				listen := cfg.Listen
				if !cmd.Flags().Changed("listen") {
					listen = "127.0.0.1:0"
				}
				return agent.RunHost(ctx, agent.HostConfig{Name: cfg.HostName, DataDir: cfg.DataDir, Listen: listen,
					Managers: splitList(managers), JoinToken: joinToken, Accel: cfg.Accel, ImageDir: cfg.ImageDir,
					GuestAgent: cfg.GuestAgent, Progress: progress, Logger: log, StoragePool: storagePool, FenceAfter: fenceAfter})
			}
			cfg.Logger = log
			cfg.Progress = progress
			cfg.Overcommit = oc
			cfg.Ready = func(addr string) {
				fmt.Fprintf(os.Stderr, "\nVigil is running: API on https://%s, data in %s.\n", addr, cfg.DataDir)
				fmt.Fprintf(os.Stderr, "The CLI configuration (API, CA, admin token) is in %s/client.yaml,\n", cfg.DataDir)
				fmt.Fprintf(os.Stderr, "and in %s unless you had your own. In another terminal try:\n", client.DefaultConfigPath())
				fmt.Fprintf(os.Stderr, "  vigil vm create web1 --memory 128M --cpus 1 --disk 256M --start --wait\n")
				fmt.Fprintf(os.Stderr, "  vigil vm list; vigil vm show web1; vigil events --follow\n")
				fmt.Fprintf(os.Stderr, "  vigil dashboard   # a one-use link that signs a browser in to the web dashboard\n")
				fmt.Fprintf(os.Stderr, "Stop with Ctrl-C: virtual servers keep running and are adopted at the next start.\n\n")
			}
			return agent.RunDev(ctx, cfg)
		},
	}
	f := cmd.Flags()
	f.BoolVar(&dev, "dev", false, "run manager, embedded etcd and a host agent in one process")
	f.StringVar(&managerFlag, "manager", "", "alone: run a manager (hosts join it); with --host: the manager URLs, comma-separated, tried in turn")
	f.Lookup("manager").NoOptDefVal = noValue
	f.BoolVar(&isHost, "host", false, "run a host agent that joins a manager")
	f.BoolVar(&bootOnly, "boot", false, "run a boot service alone, on the cluster's store (--etcd-endpoints): DHCP needs root, managers need not")
	f.StringVar(&cfg.Listen, "listen", envOr("VIGIL_LISTEN", "127.0.0.1:7070"), "API listen address (env VIGIL_LISTEN); for --host, where managers reach it (default a free loopback port)")
	f.StringVar(&cfg.DataDir, "data-dir", envOr("VIGIL_DATA_DIR", agent.DefaultDataDir()), "where VMs, images and etcd live (env VIGIL_DATA_DIR)")
	f.StringVar(&cfg.HostName, "name", "", "host (or manager) name (default for --dev: the machine's hostname)")
	f.StringVar(&cfg.Accel, "accel", envOr("VIGIL_ACCEL", "auto"), "accelerator: auto, kvm or tcg (env VIGIL_ACCEL)")
	f.StringVar(&cfg.ImageDir, "image-dir", "", "guest image directory (default DATA_DIR/images/default)")
	f.StringVar(&cfg.GuestAgent, "guest-agent", "", "vigil-guest binary for building the image (default: next to vigil)")
	managers = envOr("VIGIL_MANAGERS", "")
	f.StringVar(&joinToken, "join-token", envOr("VIGIL_JOIN_TOKEN", ""), "with --host: a token from 'vigil host join-token' (env VIGIL_JOIN_TOKEN)")
	// Read once: the processes the agent starts (QEMU) need not see it.
	os.Unsetenv("VIGIL_JOIN_TOKEN")
	f.StringVar(&etcdEndpoints, "etcd-endpoints", "", "with --manager: an external etcd cluster (comma-separated URLs) instead of the embedded one; with --boot: the cluster's store (an external etcd, or unix://MANAGER_DATA_DIR/etcd/client.sock on a manager's machine)")
	f.StringVar(&etcdPeers, "etcd-peers", "", "with --manager and --name: form an embedded etcd cluster with these managers (name=http://HOST:PEERPORT,...)")
	f.StringVar(&storagePool, "storage-pool", envOr("VIGIL_STORAGE_POOL", ""), "with --host: a directory every host of the pool mounts (NFS, CephFS, or shared on one machine) for VM disks and state, so VMs can move between hosts (env VIGIL_STORAGE_POOL)")
	f.DurationVar(&fenceAfter, "fence-after", agent.DefaultFenceAfter, "with --host: kill this host's VMs after this long without any manager")
	f.DurationVar(&deadAfter, "host-dead-after", manager.DefaultHostDeadAfter, "with --manager: declare a host dead (and restart its VMs elsewhere) after this long without heartbeats; must exceed every host's --fence-after by 2s")
	f.Float64Var(&oc.Memory, "memory-overcommit", manager.DefaultOvercommit.Memory, "with --manager or --dev: memory the scheduler may promise a host, as a multiple of what it has (1.0: never more)")
	f.Float64Var(&oc.CPU, "cpu-overcommit", manager.DefaultOvercommit.CPU, "with --manager or --dev: vCPUs the scheduler may promise a host, per host CPU")
	f.DurationVar(&certTTL, "cert-ttl", 24*time.Hour, "with --manager: how long the certificates issued to hosts and managers live (renewed at half-life)")
	f.StringVar(&etcdCA, "etcd-ca", "", "with --etcd-endpoints: CA certificate (PEM file) of the external etcd's TLS")
	f.StringVar(&etcdCert, "etcd-cert", "", "with --etcd-endpoints: client certificate (PEM file) for the external etcd")
	f.StringVar(&etcdKey, "etcd-key", "", "with --etcd-endpoints: client key (PEM file) for the external etcd")
	f.StringVar(&cfg.DefaultNetwork, "default-network", envOr("VIGIL_DEFAULT_NETWORK", ""), "with --dev: make network 'default' on this subnet with NAT (e.g. 10.231.0.0/24; needs root), which VMs join unless they name another (env VIGIL_DEFAULT_NETWORK)")
	f.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	f.StringVar(&boot.Interface, "boot-interface", "", "with --manager or --boot: run the boot service for stateless hosts on this interface (DHCP, iPXE over HTTP, signed configurations over TLS)")
	f.StringVar(&boot.Range, "boot-range", "", "with --boot-interface: addresses given to booting machines, FIRST-LAST (default: the upper half of the interface's subnet)")
	f.IntVar(&boot.HTTPPort, "boot-http-port", 8067, "with --boot-interface: port of the iPXE scripts and host images (plain HTTP: iPXE has no HTTPS)")
	f.IntVar(&boot.TLSPort, "boot-tls-port", 8068, "with --boot-interface: port of the signed host configurations (TLS)")
	f.BoolVar(&boot.ProxyDHCP, "boot-proxy-dhcp", false, "with --boot-interface: the boot network has its own DHCP server, which gives the addresses; answer only iPXE, with where to boot from (ProxyDHCP)")
	f.StringSliceVar(&boot.ManagerURLs, "boot-manager-url", nil, "with --boot-interface: manager API URLs booted hosts join (default: this manager's API on the boot interface's address)")
	return cmd
}

// noValue marks --manager given without a value.
const noValue = "\x00"

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

func envOr(key, def string) string {
	if v := strings.TrimSpace(os.Getenv(key)); v != "" {
		return v
	}
	return def
}
