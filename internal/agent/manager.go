package agent

import (
	"context"
	"crypto/tls"
	"crypto/x509"
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
	"github.com/vigil-project/vigil/internal/imagestore"
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
	// CertTTL is the life of node certificates (default 24h).
	CertTTL time.Duration
	// EtcdTLS, for an external etcd over https.
	EtcdTLS EtcdTLS
	// Boot, if it names an interface, runs the boot service there.
	Boot *BootConfig
}

// EtcdTLS are PEM files for an external etcd's TLS (all optional: the CA
// to trust, a client certificate and key if etcd asks for one).
type EtcdTLS struct{ CA, Cert, Key string }

func (e EtcdTLS) config() (*tls.Config, error) {
	if e == (EtcdTLS{}) {
		return nil, nil
	}
	c := &tls.Config{MinVersion: tls.VersionTLS12}
	if e.CA != "" {
		b, err := os.ReadFile(e.CA)
		if err != nil {
			return nil, fmt.Errorf("--etcd-ca: %w", err)
		}
		c.RootCAs = x509.NewCertPool()
		if !c.RootCAs.AppendCertsFromPEM(b) {
			return nil, fmt.Errorf("--etcd-ca %s holds no PEM certificate", e.CA)
		}
	}
	if e.Cert != "" || e.Key != "" {
		kp, err := tls.LoadX509KeyPair(e.Cert, e.Key)
		if err != nil {
			return nil, fmt.Errorf("--etcd-cert/--etcd-key: %w", err)
		}
		c.Certificates = []tls.Certificate{kp}
	}
	return c, nil
}

// connectEtcd connects to an etcd cluster outside this process and checks
// that it answers.
func connectEtcd(ctx context.Context, endpoints []string, t EtcdTLS) (*clientv3.Client, error) {
	tc, err := t.config()
	if err != nil {
		return nil, err
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: endpoints, DialTimeout: 5 * time.Second, TLS: tc})
	if err != nil {
		return nil, fmt.Errorf("connect to etcd %s: %w", strings.Join(endpoints, ","), err)
	}
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	_, err = cli.Status(sctx, endpoints[0])
	cancel()
	if err != nil {
		cli.Close()
		return nil, fmt.Errorf("etcd at %s does not answer: %w", endpoints[0], err)
	}
	return cli, nil
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
	var st *store.Store
	if len(cfg.EtcdEndpoints) > 0 {
		if cli, err = connectEtcd(ctx, cfg.EtcdEndpoints, cfg.EtcdTLS); err != nil {
			return err
		}
		defer cli.Close()
		st = store.New(cli, "/vigil/")
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
		cli, st = etcd.Client(), etcd.Store("/vigil/")
	}
	if cfg.Name == "" {
		cfg.Name, _ = os.Hostname()
	}
	id, err := managerIdentity(ctx, st, cfg.Name, cfg.Listen, cfg.CertTTL)
	if err != nil {
		return err
	}
	images, err := imagestore.Open(filepath.Join(cfg.DataDir, "images", "blobs"))
	if err != nil {
		return err
	}
	boot, err := bootService(cfg.Boot, ln)
	if err != nil {
		return err
	}
	mgr := manager.New(manager.Config{Store: st, Events: events.New(1000), Logger: log, Name: cfg.Name, Identity: id, CertTTL: cfg.CertTTL,
		Images: images, URL: apiURL(ln), BootImages: BootImagesDir(cfg.DataDir), Boot: boot,
		HostDeadAfter: cfg.HostDeadAfter, ShareEvents: true, Overcommit: cfg.Overcommit, StepHook: crashHook(log)})
	cpath, err := writeClientConfigs(ctx, mgr, cfg.DataDir, "admin-"+cfg.Name, apiURL(ln), id.CA.CertPEM, false)
	if err != nil {
		return err
	}
	log.Info("admin cli configuration written", "path", cpath)
	return serve(ctx, tls.NewListener(ln, id.ServerTLS()), mgr, log, cfg.Ready, func(ctx context.Context) {
		var wg sync.WaitGroup
		wg.Add(2)
		go func() { defer wg.Done(); mgr.Run(ctx) }()
		// On every manager, not only the leader: under the quota alarm no
		// leader can be elected (campaigning writes), and compacting twice
		// is harmless.
		go func() { defer wg.Done(); store.NewMaintainer(cli, store.MaintainConfig{}, log).Run(ctx) }()
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
	// The controllers (and the VM locks they hold) outlive the API's
	// drain: a request still running at shutdown keeps its lock until it
	// has recorded its outcome.
	ctlCtx, stopControllers := context.WithCancel(context.WithoutCancel(ctx))
	ctlDone := make(chan struct{})
	go func() { defer close(ctlDone); controllers(ctlCtx) }()
	defer func() { stopControllers(); <-ctlDone }()
	srv := newServer(mgr.Handler(), ctlCtx)
	srvDone := make(chan error, 1)
	go func() { srvDone <- srv.Serve(ln) }()
	log.Info("vigil manager ready", "api", "https://"+ln.Addr().String())
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
