package agent

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/vigil-project/vigil/client"
	"github.com/vigil-project/vigil/internal/manager"
	"github.com/vigil-project/vigil/internal/store"
)

// clientConfigName is the admin's CLI configuration an agent writes in its
// data dir: the API's URL, the cluster CA, an admin token (mode 0600).
const clientConfigName = "client.yaml"

// writtenByDev marks a user configuration written by 'vigil agent --dev',
// which a later dev agent may overwrite (a file the user wrote, it never
// touches).
const writtenByDev = "vigil agent --dev"

// managerIdentity loads (or, on the first manager, creates) the cluster CA
// and issues this manager its certificate for the address it listens on.
func managerIdentity(ctx context.Context, st *store.Store, name, listen string, ttl time.Duration) (*manager.Identity, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	ca, err := manager.LoadOrCreateCA(ctx, st, name)
	if err != nil {
		return nil, err
	}
	return manager.NewIdentity(ca, name, listen, ttl)
}

// apiURL is how a local client reaches the API on ln.
func apiURL(ln net.Listener) string {
	a := ln.Addr().(*net.TCPAddr)
	ip := a.IP
	if ip.IsUnspecified() {
		ip = net.IPv4(127, 0, 0, 1)
	}
	return "https://" + net.JoinHostPort(ip.String(), fmt.Sprint(a.Port))
}

// writeClientConfigs writes DATA_DIR/client.yaml with a working admin token
// (the one already there if it still works), and, for the dev agent, the
// user's default CLI configuration when there is none (or when a dev agent
// wrote it), so that 'vigil vm list' in another terminal just works.
func writeClientConfigs(ctx context.Context, mgr *manager.Manager, dataDir, tokenName, url string, caPEM []byte, dev bool) (string, error) {
	path := filepath.Join(dataDir, clientConfigName)
	old, _ := client.LoadConfig(path)
	tok, err := mgr.EnsureAdminToken(ctx, tokenName, old.Token)
	if err != nil {
		return "", fmt.Errorf("make the admin token: %w", err)
	}
	cfg := client.Config{URL: url, CACert: string(caPEM), Token: tok}
	if err := client.WriteConfig(path, cfg); err != nil {
		return "", err
	}
	if !dev {
		return path, nil
	}
	user := client.DefaultConfigPath()
	cur, err := client.LoadConfig(user)
	if err == nil && cur.WrittenBy != writtenByDev {
		return path, nil // the user's own: leave it
	}
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		if _, serr := os.Stat(user); serr == nil {
			return path, nil // unreadable but there: not ours to replace
		}
	}
	cfg.WrittenBy = writtenByDev
	if err := client.WriteConfig(user, cfg); err != nil {
		return path, fmt.Errorf("write the default cli configuration: %w", err)
	}
	return path, nil
}
