package agent

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/vigil-project/vigil/internal/events"
	"github.com/vigil-project/vigil/internal/manager"
	"github.com/vigil-project/vigil/internal/remotehost"
	"github.com/vigil-project/vigil/internal/store"
)

var _ manager.Host = (*remotehost.Host)(nil)

// ManagerConfig configures `vigil agent --manager`.
type ManagerConfig struct {
	Listen  string
	DataDir string
	// EtcdEndpoints, if set, names an external etcd cluster; otherwise a
	// single-member etcd is embedded under DataDir.
	EtcdEndpoints []string
	Logger        *slog.Logger
	Ready         func(addr string)
}

// RunManager runs a manager (API, controllers, store) with no host of its
// own: hosts join it with `vigil agent --host`.
func RunManager(ctx context.Context, cfg ManagerConfig) error {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(cfg.DataDir, 0o755); err != nil {
		return fmt.Errorf("create data dir %s: %w", cfg.DataDir, err)
	}
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen on %s: %w (use --listen to pick another address)", cfg.Listen, err)
	}
	defer ln.Close()

	var cli *clientv3.Client
	if len(cfg.EtcdEndpoints) > 0 {
		cli, err = clientv3.New(clientv3.Config{Endpoints: cfg.EtcdEndpoints, DialTimeout: 5 * time.Second})
		if err != nil {
			return fmt.Errorf("connect to etcd %s: %w", strings.Join(cfg.EtcdEndpoints, ","), err)
		}
		defer cli.Close()
		sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		_, err = cli.Status(sctx, cfg.EtcdEndpoints[0])
		cancel()
		if err != nil {
			return fmt.Errorf("etcd at %s does not answer: %w", cfg.EtcdEndpoints[0], err)
		}
	} else {
		etcd, err := store.StartEmbedded(ctx, filepath.Join(cfg.DataDir, "etcd"), log)
		if err != nil {
			return err
		}
		defer etcd.Close()
		cli = etcd.Client()
	}
	mgr := manager.New(manager.Config{Store: store.New(cli, "/vigil/"), Events: events.New(1000), Logger: log})
	if err := mgr.LoadHosts(ctx); err != nil {
		return fmt.Errorf("load hosts: %w", err)
	}
	return serve(ctx, ln, mgr, log, cfg.Ready)
}

// serve runs the API and the controllers until ctx ends.
func serve(ctx context.Context, ln net.Listener, mgr *manager.Manager, log *slog.Logger, ready func(string)) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	srv := &http.Server{Handler: mgr.Handler(), ReadHeaderTimeout: 10 * time.Second, BaseContext: func(net.Listener) context.Context { return ctx }}
	srvDone := make(chan error, 1)
	go func() { srvDone <- srv.Serve(ln) }()
	go mgr.Run(ctx, 2*time.Second)
	log.Info("vigil manager ready", "api", "http://"+ln.Addr().String())
	if ready != nil {
		ready(ln.Addr().String())
	}
	var err error
	select {
	case <-ctx.Done():
	case err = <-srvDone:
		err = fmt.Errorf("api server: %w", err)
	}
	shutCtx, c2 := context.WithTimeout(context.Background(), 5*time.Second)
	srv.Shutdown(shutCtx)
	c2()
	return err
}
