package agent

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"

	"github.com/vigil-project/vigil/internal/events"
	"github.com/vigil-project/vigil/internal/manager"
	"github.com/vigil-project/vigil/internal/store"
)

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
	mgr := manager.New(manager.Config{Store: store.New(cli, "/vigil/"), Events: events.New(1000), Logger: log, Name: cfg.Name,
		HostDeadAfter: cfg.HostDeadAfter, ShareEvents: true, Overcommit: cfg.Overcommit, StepHook: crashHook(log)})
	return serve(ctx, ln, mgr, log, cfg.Ready, func(ctx context.Context) {
		var wg sync.WaitGroup
		wg.Add(1)
		go func() { defer wg.Done(); mgr.Run(ctx) }()
		lead(ctx, cli, cfg.Name, mgr, log)
		wg.Wait()
	})
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
		done := make(chan struct{})
		go func() { defer close(done); mgr.Lead(lctx) }()
		select {
		case <-ctx.Done():
		case <-sess.Done():
			log.Warn("lost leadership (etcd session ended)", "manager", name)
		}
		mgr.SetLeader(false)
		cancel()
		// The controllers must have stopped before this manager campaigns
		// again: two sets of them would fight over the same VMs.
		<-done
		rctx, rcancel := context.WithTimeout(context.Background(), time.Second)
		el.Resign(rctx)
		rcancel()
		sess.Close()
	}
}

// serve runs the API until ctx ends, and controllers runs the controllers
// (directly, or only while leading); it returns once both stopped.
func serve(ctx context.Context, ln net.Listener, mgr *manager.Manager, log *slog.Logger, ready func(string), controllers func(context.Context)) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	srv := newServer(mgr.Handler(), ctx)
	srvDone := make(chan error, 1)
	go func() { srvDone <- srv.Serve(ln) }()
	ctlDone := make(chan struct{})
	go func() { defer close(ctlDone); controllers(ctx) }()
	defer func() { cancel(); <-ctlDone }()
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

// newServer is an HTTP server with time limits on every phase of a
// request except the response (event streams and consoles are long), and
// idle connections closed after a while.
func newServer(h http.Handler, ctx context.Context) *http.Server {
	return &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second, ReadTimeout: time.Minute, IdleTimeout: 2 * time.Minute,
		BaseContext: func(net.Listener) context.Context { return ctx }}
}

// crashHook returns the manager's step hook: with VIGIL_CRASH_AT=op/step
// (a comma-separated list) in the environment the process kills itself
// (SIGKILL, no clean-up) right after such a step, as a crashing manager
// would. Tests use it to kill a manager at a known point of a migration, a
// suspend or a snapshot; nothing else sets it.
func crashHook(log *slog.Logger) func(string) {
	at := os.Getenv("VIGIL_CRASH_AT")
	if at == "" {
		return nil
	}
	steps := strings.Split(at, ",")
	return func(step string) {
		if !slices.Contains(steps, step) {
			return
		}
		log.Warn("VIGIL_CRASH_AT reached: killing this process", "step", step)
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
	}
}
