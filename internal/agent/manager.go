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
	"go.etcd.io/etcd/client/v3/concurrency"

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
	// Name and EtcdPeers make the embedded etcd one member of a cluster
	// among several managers (name=peerURL for each).
	Name      string
	EtcdPeers map[string]string
	Logger    *slog.Logger
	Ready     func(addr string)
	// HostDeadAfter: see manager.Config.
	HostDeadAfter time.Duration
	// Overcommit bounds what the scheduler promises a host (zero values:
	// manager.DefaultOvercommit).
	Overcommit manager.Overcommit
}

// RunManager runs a manager (API, controllers, store) with no host of its
// own: hosts join it with `vigil agent --host`.
func RunManager(ctx context.Context, cfg ManagerConfig) error {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ln, err := prepare(cfg.DataDir, cfg.Listen)
	if err != nil {
		return err
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
		var etcd *store.Embedded
		if len(cfg.EtcdPeers) > 0 {
			etcd, err = store.StartEmbeddedMember(ctx, filepath.Join(cfg.DataDir, "etcd"), store.ClusterConfig{Name: cfg.Name, Peers: cfg.EtcdPeers}, log)
		} else {
			etcd, err = store.StartEmbedded(ctx, filepath.Join(cfg.DataDir, "etcd"), log)
		}
		if err != nil {
			return err
		}
		defer etcd.Close()
		cli = etcd.Client()
	}
	mgr := manager.New(manager.Config{Store: store.New(cli, "/vigil/"), Events: events.New(1000), Logger: log, Name: cfg.Name, HostDeadAfter: cfg.HostDeadAfter, ShareEvents: true, Overcommit: cfg.Overcommit})
	go mgr.WatchHosts(ctx)
	go mgr.ShareEvents(ctx)
	return serve(ctx, ln, mgr, log, cfg.Ready, func(ctx context.Context) { lead(ctx, cli, cfg.Name, mgr, log) })
}

// lead campaigns for leadership through etcd and runs the controllers only
// while this manager leads; every manager serves the API meanwhile. Losing
// the etcd session (a partition) stops the controllers until re-elected.
func lead(ctx context.Context, cli *clientv3.Client, name string, mgr *manager.Manager, log *slog.Logger) {
	if name == "" {
		name, _ = os.Hostname()
	}
	for ctx.Err() == nil {
		sess, err := concurrency.NewSession(cli, concurrency.WithTTL(3))
		if err != nil {
			log.Warn("leader election: no etcd session", "err", err)
			time.Sleep(time.Second)
			continue
		}
		el := concurrency.NewElection(sess, "/vigil/leader")
		if err := el.Campaign(ctx, name); err != nil {
			sess.Close()
			continue
		}
		log.Info("this manager leads: running the controllers", "manager", name)
		lctx, cancel := context.WithCancel(ctx)
		mgr.SetLeader(true)
		go mgr.Run(lctx, 2*time.Second)
		go mgr.WatchHostFailures(lctx)
		select {
		case <-ctx.Done():
		case <-sess.Done():
			log.Warn("lost leadership (etcd session ended)", "manager", name)
		}
		mgr.SetLeader(false)
		cancel()
		rctx, rcancel := context.WithTimeout(context.Background(), time.Second)
		el.Resign(rctx)
		rcancel()
		sess.Close()
	}
}

// serve runs the API until ctx ends, and controllers runs the controllers
// (directly, or only while leading).
func serve(ctx context.Context, ln net.Listener, mgr *manager.Manager, log *slog.Logger, ready func(string), controllers func(context.Context)) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	srv := &http.Server{Handler: mgr.Handler(), ReadHeaderTimeout: 10 * time.Second, BaseContext: func(net.Listener) context.Context { return ctx }}
	srvDone := make(chan error, 1)
	go func() { srvDone <- srv.Serve(ln) }()
	go controllers(ctx)
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
