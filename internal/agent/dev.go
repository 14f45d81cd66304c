// Package agent wires Vigil's parts into the processes `vigil agent` runs.
// Dev mode is all of them in one process: embedded etcd, manager, API and one
// host agent, as a laptop or CI wants it.
package agent

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/events"
	"github.com/vigil-project/vigil/internal/guestimage"
	"github.com/vigil-project/vigil/internal/hostagent"
	"github.com/vigil-project/vigil/internal/hostproto"
	"github.com/vigil-project/vigil/internal/imagestore"
	"github.com/vigil-project/vigil/internal/manager"
	"github.com/vigil-project/vigil/internal/store"
)

// DevConfig configures `vigil agent --dev`.
type DevConfig struct {
	Listen   string // API address, e.g. 127.0.0.1:7070
	DataDir  string
	HostName string
	Accel    string
	// ImageDir holds the guest image (default DataDir/images/default).
	ImageDir string
	// GuestAgent is the static vigil-guest binary, used if the image must be built.
	GuestAgent string
	// Progress receives image build progress; may be nil.
	Progress  func(string)
	Logger    *slog.Logger
	Reconcile time.Duration // controller period (default 2s)
	// Ready, if set, is called with the API's address once it serves.
	Ready func(addr string)
	// DefaultNetwork, if set, is the subnet of network "default" (with
	// NAT), made at start unless it exists: VMs created without --network
	// join it. Empty: no default network (VMs get user-mode networking).
	DefaultNetwork string
	// Overcommit bounds what the scheduler promises the host (zero values:
	// manager.DefaultOvercommit).
	Overcommit manager.Overcommit
}

// DefaultDataDir is /var/lib/vigil for root, else $XDG_STATE_HOME/vigil.
func DefaultDataDir() string {
	if os.Geteuid() == 0 {
		return "/var/lib/vigil"
	}
	if d := os.Getenv("XDG_STATE_HOME"); d != "" {
		return filepath.Join(d, "vigil")
	}
	home, _ := os.UserHomeDir()
	return filepath.Join(home, ".local", "state", "vigil")
}

// RunDev runs the all-in-one agent until ctx ends. VMs keep running after it
// returns; a later RunDev on the same data dir adopts them.
func RunDev(ctx context.Context, cfg DevConfig) error {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if cfg.DataDir == "" {
		cfg.DataDir = DefaultDataDir()
	}
	if cfg.HostName == "" {
		cfg.HostName, _ = os.Hostname()
	}
	if cfg.ImageDir == "" {
		cfg.ImageDir = filepath.Join(cfg.DataDir, "images", "default")
	}
	if cfg.Reconcile == 0 {
		cfg.Reconcile = 2 * time.Second
	}
	ln, err := prepare(cfg.DataDir, cfg.Listen)
	if err != nil {
		return err
	}
	defer ln.Close()

	var mgr *manager.Manager
	images, err := imagestore.Open(filepath.Join(cfg.DataDir, "images", "blobs"))
	if err != nil {
		return err
	}
	host, err := newHostAgent(ctx, hostSetup{images: localImages{images}, name: cfg.HostName, dataDir: cfg.DataDir, accel: cfg.Accel, imageDir: cfg.ImageDir,
		guestAgent: cfg.GuestAgent, progress: cfg.Progress, log: log,
		notify: func(e hostproto.Event) {
			if mgr != nil {
				mgr.HandleHostEvent(e)
			}
		}})
	if err != nil {
		return err
	}

	etcd, err := store.StartEmbedded(ctx, filepath.Join(cfg.DataDir, "etcd"), log)
	if err != nil {
		return err
	}
	defer etcd.Close()
	broker := events.New(1000)
	info := host.HostInfo()
	st := etcd.Store("/vigil/")
	id, err := managerIdentity(ctx, st, cfg.HostName, cfg.Listen, 0)
	if err != nil {
		return err
	}
	mgr = manager.New(manager.Config{Name: cfg.HostName, Identity: id, Images: images, URL: apiURL(ln),
		Store: st, Host: manager.LocalHost(cfg.HostName, host), Events: broker, Logger: log,
		Limits:     manager.Limits{MaxMemoryBytes: info.MemoryBytes, MaxCPUs: max(64, 4*runtime.NumCPU())},
		Resync:     cfg.Reconcile,
		StepHook:   crashHook(log),
		Overcommit: cfg.Overcommit,
	})
	// Adopt surviving QEMUs only now, so their events reach the manager.
	if err := host.Recover(ctx); err != nil {
		return err
	}
	cpath, err := writeClientConfigs(ctx, mgr, cfg.DataDir, "admin", apiURL(ln), id.CA.CertPEM, true)
	if err != nil {
		return err
	}
	if err := ensureDefaultNetwork(ctx, mgr, cfg.DefaultNetwork, log); err != nil {
		return err
	}
	hostCtx, stopHost := context.WithCancel(context.Background())
	hostDone := make(chan error, 1)
	go func() { hostDone <- host.Run(hostCtx) }()
	ready := func(addr string) {
		broker.Publish(api.Event{Type: "host.up", Host: cfg.HostName, Message: fmt.Sprintf("accel %s, %d cpus", info.Accel, info.CPUs)})
		log.Info("vigil agent ready", "api", "https://"+addr, "data_dir", cfg.DataDir, "host", cfg.HostName, "accel", info.Accel, "cli_config", cpath)
		if cfg.Ready != nil {
			cfg.Ready(addr)
		}
	}
	controllers := func(ctx context.Context) {
		mgr.SetLeader(true) // the only manager there is
		var wg sync.WaitGroup
		wg.Add(2)
		go func() { defer wg.Done(); mgr.Run(ctx) }()
		go func() { defer wg.Done(); store.NewMaintainer(etcd.Client(), store.MaintainConfig{}, log).Run(ctx) }()
		mgr.Lead(ctx)
		wg.Wait()
	}
	err = serve(ctx, tls.NewListener(ln, id.ServerTLS()), mgr, log, ready, controllers)
	stopHost()
	<-hostDone
	log.Info("vigil agent stopped; virtual machines keep running")
	return err
}

// prepare makes the data dir and listens, first: a taken port is the most
// common start-up failure and should be reported before anything starts.
func prepare(dataDir, listen string) (net.Listener, error) {
	if err := os.MkdirAll(dataDir, 0o755); err != nil {
		return nil, fmt.Errorf("create data dir %s: %w", dataDir, err)
	}
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w (another vigil agent running? use --listen to pick another address)", listen, err)
	}
	return ln, nil
}

// hostSetup is what a host agent needs, in dev and in host mode alike.
type hostSetup struct {
	images                                     hostagent.ImageSource
	name, dataDir, accel, imageDir, guestAgent string
	storagePool, migrationHost                 string
	qemuVersion                                string // known already, or empty
	// migrationTLSDir: see hostagent.Config (none in dev mode: one host).
	migrationTLSDir string
	// peerTLS: see hostagent.Config.PeerTLS (none in dev mode).
	peerTLS  func(string) *tls.Config
	progress func(string)
	log      *slog.Logger
	notify   func(hostproto.Event)
}

// newHostAgent makes sure the guest image exists and creates the host
// agent over dataDir/host. Recover and Run are the caller's.
func newHostAgent(ctx context.Context, s hostSetup) (*hostagent.Agent, error) {
	img, err := ensureImage(ctx, s.imageDir, s.guestAgent, s.progress)
	if err != nil {
		return nil, err
	}
	return hostagent.New(hostagent.Config{
		Name: s.name, DataDir: filepath.Join(s.dataDir, "host"), Accel: s.accel, QEMUVersion: s.qemuVersion, StoragePool: s.storagePool, MigrationHost: s.migrationHost,
		MigrationTLSDir: s.migrationTLSDir, PeerTLS: s.peerTLS, Images: s.images,
		Image:  hostagent.Image{Kernel: img.Kernel, Initrd: img.Initrd, Cmdline: img.Cmdline},
		Logger: s.log, Notify: s.notify,
	})
}

func ensureImage(ctx context.Context, dir, guestAgent string, progress func(string)) (*guestimage.Image, error) {
	img, err := guestimage.Load(dir)
	if err == nil {
		return img, nil
	}
	if !errors.Is(err, guestimage.ErrNotBuilt) {
		return nil, fmt.Errorf("guest image in %s: %w (rebuild it with 'vigil image build')", dir, err)
	}
	return BuildImage(ctx, dir, guestAgent, progress)
}

// BuildImage builds (or reuses) the guest image in dir with the given
// vigil-guest binary (default: next to this executable).
func BuildImage(ctx context.Context, dir, guestAgent string, progress func(string)) (*guestimage.Image, error) {
	if guestAgent == "" {
		exe, err := os.Executable()
		if err == nil {
			guestAgent = filepath.Join(filepath.Dir(exe), "vigil-guest")
		}
	}
	if _, err := os.Stat(guestAgent); err != nil {
		return nil, fmt.Errorf("guest agent binary %s not found: build it with 'make build' or pass --guest-agent", guestAgent)
	}
	var pw progressWriter = func(string) {}
	if progress != nil {
		pw = progress
	}
	img, err := guestimage.Ensure(ctx, guestimage.Options{
		Dir: dir, CacheDir: filepath.Join(filepath.Dir(dir), "cache"), GuestAgent: guestAgent, Progress: pw,
	})
	if err != nil {
		return nil, fmt.Errorf("build guest image: %w", err)
	}
	return img, nil
}

// progressWriter adapts a line callback to io.Writer.
type progressWriter func(string)

func (p progressWriter) Write(b []byte) (int, error) {
	p(string(b))
	return len(b), nil
}

// ensureDefaultNetwork makes network "default" (subnet, NAT) unless it
// exists; one that exists is kept as it is.
func ensureDefaultNetwork(ctx context.Context, mgr *manager.Manager, subnet string, log *slog.Logger) error {
	if subnet == "" {
		return nil
	}
	if n, err := mgr.Network(ctx, manager.DefaultNetwork); err == nil {
		if n.Subnet != subnet {
			log.Warn("network default exists with another subnet; keeping it", "subnet", n.Subnet, "asked", subnet)
		}
		return nil
	}
	n, err := mgr.CreateNetwork(ctx, api.NetworkCreateRequest{Name: manager.DefaultNetwork, Subnet: subnet, NAT: true}, "vigil agent --dev")
	if err != nil {
		return fmt.Errorf("--default-network %s: %w", subnet, err)
	}
	log.Info("network default made: VMs created without --network join it", "subnet", n.Subnet, "gateway", n.Gateway)
	return nil
}
