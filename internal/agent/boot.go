package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/vigil-project/vigil/internal/bootsvc"
	"github.com/vigil-project/vigil/internal/manager"
	"github.com/vigil-project/vigil/internal/pki"
	"github.com/vigil-project/vigil/internal/store"
)

// BootConfig runs a manager's boot service for stateless hosts.
type BootConfig struct {
	Interface string
	// Range is FIRST-LAST (empty: the upper half of the interface's subnet).
	Range             string
	HTTPPort, TLSPort int
	// ManagerURLs are what booted hosts join (empty: this manager's API
	// port on the boot interface's address, if the API listens there).
	ManagerURLs []string
	// ProxyDHCP: the network's own DHCP server gives the addresses.
	ProxyDHCP bool
}

// BootImagesDir is where a manager keeps host images.
func BootImagesDir(dataDir string) string { return filepath.Join(dataDir, "boot", "images") }

// bootService turns the flags into the boot service's configuration.
func bootService(b *BootConfig, ln net.Listener) (*bootsvc.Config, error) {
	if b == nil || b.Interface == "" {
		return nil, nil
	}
	cfg := &bootsvc.Config{Interface: b.Interface, HTTPPort: b.HTTPPort, TLSPort: b.TLSPort, ManagerURLs: b.ManagerURLs, ProxyDHCP: b.ProxyDHCP}
	if b.ProxyDHCP && b.Range != "" {
		return nil, fmt.Errorf("--boot-range and --boot-proxy-dhcp: with ProxyDHCP the network's own DHCP server gives the addresses; drop --boot-range")
	}
	if b.Range != "" {
		first, last, ok := strings.Cut(b.Range, "-")
		f, err1 := netip.ParseAddr(strings.TrimSpace(first))
		l, err2 := netip.ParseAddr(strings.TrimSpace(last))
		if !ok || err1 != nil || err2 != nil || !f.Is4() || !l.Is4() {
			return nil, fmt.Errorf("--boot-range %q: give FIRST-LAST IPv4 addresses, e.g. 10.77.0.100-10.77.0.199", b.Range)
		}
		cfg.First, cfg.Last = f, l
	}
	if len(cfg.ManagerURLs) == 0 {
		ifi, err := net.InterfaceByName(b.Interface)
		if err != nil {
			return nil, fmt.Errorf("--boot-interface %s: %w", b.Interface, err)
		}
		addrs, _ := ifi.Addrs()
		api := ln.Addr().(*net.TCPAddr)
		for _, a := range addrs {
			if n, ok := a.(*net.IPNet); ok && n.IP.To4() != nil && (api.IP.IsUnspecified() || api.IP.Equal(n.IP)) {
				cfg.ManagerURLs = []string{"https://" + net.JoinHostPort(n.IP.String(), strconv.Itoa(api.Port))}
				break
			}
		}
		if len(cfg.ManagerURLs) == 0 {
			return nil, fmt.Errorf("booted hosts could not reach this manager's API (%s) from %s: listen on the boot interface's address or on 0.0.0.0, or give --boot-manager-url", api, b.Interface)
		}
	}
	return cfg, nil
}

// BootOnlyConfig configures `vigil agent --boot`: a boot service alone, on
// the cluster's store, with no API and no controllers. DHCP needs root;
// the managers need not: this is how they part.
type BootOnlyConfig struct {
	Name    string
	DataDir string // host images are in BootImagesDir(DataDir)
	// EtcdEndpoints reach the cluster's store: an external etcd, or a
	// manager's embedded one on the same machine
	// (unix://MANAGER_DATA_DIR/etcd/client.sock).
	EtcdEndpoints []string
	EtcdTLS       EtcdTLS
	Boot          BootConfig
	CertTTL       time.Duration
	Logger        *slog.Logger
}

// RunBoot runs a boot service alone until ctx ends.
func RunBoot(ctx context.Context, cfg BootOnlyConfig) error {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if len(cfg.EtcdEndpoints) == 0 {
		return errors.New("--boot alone reads the cluster's boot registry from its store: give --etcd-endpoints (an external etcd, or unix://MANAGER_DATA_DIR/etcd/client.sock on a manager's machine)")
	}
	if cfg.Boot.Interface == "" {
		return errors.New("--boot needs --boot-interface")
	}
	if len(cfg.Boot.ManagerURLs) == 0 {
		return errors.New("--boot alone has no API of its own: give --boot-manager-url with the managers booted hosts join")
	}
	if cfg.Name == "" {
		cfg.Name, _ = os.Hostname()
	}
	cli, err := connectEtcd(ctx, cfg.EtcdEndpoints, cfg.EtcdTLS)
	if err != nil {
		return err
	}
	defer cli.Close()
	st := store.New(cli, "/vigil/")
	lctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	ca, err := manager.LoadCA(lctx, st)
	cancel()
	if errors.Is(err, store.ErrNotFound) {
		return errors.New("the store has no cluster ca yet: start a manager first ('vigil agent --manager')")
	}
	if err != nil {
		return err
	}
	svc, err := bootService(&cfg.Boot, nil)
	if err != nil {
		return err
	}
	// The boot service's own certificate, for the configuration endpoint
	// (hosts pin the CA the image carries).
	id, err := manager.NewIdentity(ca, cfg.Name, net.JoinHostPort("0.0.0.0", strconv.Itoa(cfg.Boot.TLSPort)), cfg.CertTTL)
	if err != nil {
		return err
	}
	go id.KeepRenewed(ctx, log)
	reg := &bootsvc.Registry{Store: st, ImagesDir: BootImagesDir(cfg.DataDir)}
	log.Info("boot service alone", "interface", cfg.Boot.Interface, "managers", cfg.Boot.ManagerURLs, "images", reg.ImagesDir)
	bootsvc.Serve(ctx, *svc, reg, ca, pki.ServerConfig(id.Holder, nil, false), manager.JoinTokens{Store: st, CA: ca}, log)
	return nil
}
