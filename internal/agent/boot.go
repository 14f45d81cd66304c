package agent

import (
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/vigil-project/vigil/internal/bootsvc"
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
