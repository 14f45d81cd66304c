package agent

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/hostagent"
	"github.com/vigil-project/vigil/internal/hostproto"
	"github.com/vigil-project/vigil/internal/pki"
)

// HostConfig configures `vigil agent --host`.
type HostConfig struct {
	Name      string
	DataDir   string
	Listen    string   // where the managers reach this host agent
	Managers  []string // manager URLs, tried in turn
	JoinToken string
	// StoragePool is the shared directory for VM disks (see hostagent.Config).
	StoragePool string
	// FenceAfter is how long the host may go without any manager before it
	// kills its VMs (default DefaultFenceAfter).
	FenceAfter time.Duration
	Accel      string
	// QEMUVersion, if set, is the QEMU binary's version as known already.
	QEMUVersion string
	ImageDir    string
	GuestAgent  string
	Progress    func(string)
	Logger      *slog.Logger
	Ready       func(addr string)
}

// RunHost runs a host agent that joins a manager: it serves the host API,
// registers, and sends a heartbeat (with its VMs' statuses and any events)
// every second, failing over between the manager URLs it was given.
func RunHost(ctx context.Context, cfg HostConfig) error {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if len(cfg.Managers) == 0 {
		return errors.New("no manager given: pass --manager URL[,URL...]")
	}
	if cfg.ImageDir == "" {
		cfg.ImageDir = filepath.Join(cfg.DataDir, "images", "default")
	}
	if cfg.FenceAfter == 0 {
		cfg.FenceAfter = DefaultFenceAfter
	}
	if cfg.FenceAfter < 2*time.Second {
		return fmt.Errorf("fence time %s is too short: heartbeats go every second, use at least 2s", cfg.FenceAfter)
	}
	ln, err := prepare(cfg.DataDir, cfg.Listen)
	if err != nil {
		return err
	}
	defer ln.Close()

	j, out, trust := newJoiner(cfg, ln, log)
	host, err := newHostAgent(ctx, hostSetup{images: j, name: cfg.Name, dataDir: cfg.DataDir, accel: cfg.Accel, imageDir: cfg.ImageDir, qemuVersion: cfg.QEMUVersion,
		guestAgent: cfg.GuestAgent, progress: cfg.Progress, log: log, notify: out.add, storagePool: cfg.StoragePool,
		// Live migrations come in on the address the managers reach us at,
		// over TLS with the host's certificate.
		migrationHost: ln.Addr().(*net.TCPAddr).IP.String(), migrationTLSDir: hostTLSDir(cfg.DataDir),
		// Checkpoints of protected VMs go to their secondary host over TLS
		// with the same certificate.
		peerTLS: trust.peerTLS})
	if err != nil {
		return err
	}
	if err := host.Recover(ctx); err != nil {
		return err
	}
	return serveJoined(ctx, cfg, log, ln, j, trust, host, host, host.Run)
}

// newJoiner is the joiner of a host listening on ln, the outbox its events
// go out by, and its credentials.
func newJoiner(cfg HostConfig, ln net.Listener, log *slog.Logger) (*joiner, *outbox, *hostTrust) {
	out := &outbox{wake: make(chan struct{}, 1)}
	j := &joiner{cfg: cfg, log: log.With("host", cfg.Name), addr: ln.Addr().String(), out: out, lastAck: time.Now()}
	return j, out, &hostTrust{dir: cfg.DataDir, name: cfg.Name, tlsDir: hostTLSDir(cfg.DataDir)}
}

// serveJoined joins (once), serves the host protocol with handler and
// heartbeats for host until ctx ends; run, if set, is the host's own work,
// stopped after the server.
func serveJoined(ctx context.Context, cfg HostConfig, log *slog.Logger, ln net.Listener, j *joiner, trust *hostTrust,
	host joinedHost, handler hostproto.Handler, run func(context.Context) error) error {
	j.host, j.trust = host, trust
	if err := j.ensureJoined(ctx); err != nil {
		return err
	}
	j.http = &http.Client{Timeout: 3 * time.Second, Transport: &http.Transport{TLSClientConfig: trust.clientTLS(), ForceAttemptHTTP2: true}}

	srv := newServer(hostGate(hostproto.Serve(handler, log)), context.Background())
	go srv.Serve(tls.NewListener(ln, trust.serverTLS()))
	hostCtx, stopHost := context.WithCancel(context.Background())
	hostDone := make(chan error, 1)
	go func() {
		if run == nil {
			<-hostCtx.Done()
			hostDone <- nil
			return
		}
		hostDone <- run(hostCtx)
	}()
	log.Info("host agent ready", "host", cfg.Name, "listen", ln.Addr().String(), "managers", strings.Join(cfg.Managers, ","))
	if cfg.Ready != nil {
		cfg.Ready(ln.Addr().String())
	}
	wdCtx, stopWatchdog := context.WithCancel(ctx)
	wdDone := make(chan struct{})
	go func() { defer close(wdDone); j.watchdog(wdCtx) }()
	runErr := j.run(ctx)
	stopWatchdog()
	<-wdDone

	shutCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	srv.Shutdown(shutCtx)
	cancel()
	stopHost()
	<-hostDone
	log.Info("host agent stopped; virtual machines keep running")
	return runErr
}

// SimulatedHost stands in for the hypervisor in the scale simulator
// (cmd/vigil-sim): the join, the trust, the server and the heartbeats
// around it are the real ones.
type SimulatedHost interface {
	joinedHost
	hostproto.Handler
}

// RunSimulatedHost runs a host agent around a simulated host, made by
// newHost with the function that queues its events for the managers.
func RunSimulatedHost(ctx context.Context, cfg HostConfig, newHost func(notify func(hostproto.Event)) SimulatedHost) error {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if len(cfg.Managers) == 0 {
		return errors.New("no manager given")
	}
	if cfg.FenceAfter == 0 {
		cfg.FenceAfter = DefaultFenceAfter
	}
	ln, err := prepare(cfg.DataDir, cfg.Listen)
	if err != nil {
		return err
	}
	defer ln.Close()
	j, out, trust := newJoiner(cfg, ln, log)
	host := newHost(out.add)
	return serveJoined(ctx, cfg, log, ln, j, trust, host, host, nil)
}

// joinedHost is what the joiner needs of the host agent.
type joinedHost interface {
	HostInfo() api.Host
	Statuses() []hostproto.VMStatus
	Fence(reason string) int
	SetCutOff(bool)
	Sweep()
}

var _ joinedHost = (*hostagent.Agent)(nil)

// joiner registers with a manager and keeps heartbeating.
type joiner struct {
	cfg      HostConfig
	log      *slog.Logger
	addr     string
	host     joinedHost
	interval time.Duration // between heartbeats (default a second)
	out      *outbox
	http     *http.Client
	// trust is the host's credentials (nil in tests that fake a manager).
	trust *hostTrust
	// dropped is how many queued events the outbox had dropped when last
	// logged.
	dropped uint64
	// reports is what the host last reported in full, and to whom.
	reports reports

	mu      sync.Mutex
	manager int       // index of the manager URL in use
	lastAck time.Time // when a manager last took a heartbeat

	// fenceMu is held while fencing, so nothing talks to a manager before
	// the host's VMs are dead.
	fenceMu sync.Mutex
	fenced  bool
}

// DefaultFenceAfter is how long a host agent goes without any manager
// before it kills its VMs. Managers wait longer (manager.DefaultHostDeadAfter)
// before they restart those VMs elsewhere.
const DefaultFenceAfter = 5 * time.Second

// fenceIfCut kills the host's VMs once no manager has taken a heartbeat for
// the fencing time. It runs before every contact with a manager and from
// the watchdog: after a SIGSTOP (or a frozen VM) the first thing the host
// does is to fence, not to report VMs that may already run elsewhere.
func (j *joiner) fenceIfCut(reason string) {
	j.fenceMu.Lock()
	defer j.fenceMu.Unlock()
	j.mu.Lock()
	silent := time.Since(j.lastAck)
	j.mu.Unlock()
	if reason == "" && silent <= j.cfg.FenceAfter {
		return
	}
	if reason == "" {
		reason = fmt.Sprintf("no manager answered for %s (fence time %s)", silent.Round(100*time.Millisecond), j.cfg.FenceAfter)
	}
	// Cut off: no pooled VM may start here until a manager hears from us,
	// and any that runs is killed (on every check, not once: a request that
	// raced the fence must not leave a copy running).
	j.host.SetCutOff(true)
	n := j.host.Fence(reason)
	if !j.fenced || n > 0 {
		j.log.Warn("fenced: killed this host's pooled vms", "vms", n, "reason", reason)
	}
	j.fenced = true
}

// acked records that a manager took a heartbeat sent at sent. The time of
// sending, not of the answer, is what the manager saw: a slow answer (or
// one that arrives after a SIGSTOP) must not stretch the fencing deadline.
func (j *joiner) acked(sent time.Time) {
	j.fenceMu.Lock()
	defer j.fenceMu.Unlock()
	j.mu.Lock()
	if sent.After(j.lastAck) {
		j.lastAck = sent
	}
	silent := time.Since(j.lastAck)
	j.mu.Unlock()
	if silent <= j.cfg.FenceAfter {
		j.fenced = false
		j.host.SetCutOff(false)
	}
}

// watchdog fences even while a heartbeat call hangs.
func (j *joiner) watchdog(ctx context.Context) {
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			j.fenceIfCut("")
		}
	}
}

// ensureJoined loads the host's credentials, or joins with the join token
// (trying each manager in turn) when the host has none.
func (j *joiner) ensureJoined(ctx context.Context) error {
	ok, err := j.trust.load()
	if err != nil || ok {
		return err
	}
	if j.cfg.JoinToken == "" {
		return fmt.Errorf("host %s has not joined a cluster: pass --join-token (from 'vigil host join-token' on a manager)", j.cfg.Name)
	}
	reg := j.registration()
	for ctx.Err() == nil {
		err := j.trust.join(ctx, j.url(), j.cfg.JoinToken, reg)
		if err == nil {
			j.log.Info("joined the cluster", "manager", j.url())
			return nil
		}
		if errors.Is(err, errRefused) {
			return err
		}
		j.log.Warn("join", "manager", j.url(), "err", err)
		j.nextManager()
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
	return ctx.Err()
}

func (j *joiner) registration() hostproto.Register {
	return hostproto.Register{Addr: j.addr, Info: j.host.HostInfo(), FenceAfterMS: j.cfg.FenceAfter.Milliseconds()}
}

// renewIfDue renews the host's certificate half way through its life.
func (j *joiner) renewIfDue(ctx context.Context) {
	if j.trust == nil || j.trust.holder == nil || time.Now().Before(pki.RenewAfter(j.trust.holder.Leaf())) {
		return
	}
	if err := j.trust.renew(ctx, j.http, j.url()); err != nil {
		j.log.Warn("renew the host's certificate", "manager", j.url(), "expires", j.trust.holder.Leaf().NotAfter, "err", err)
		return
	}
	j.log.Info("renewed the host's certificate", "expires", j.trust.holder.Leaf().NotAfter)
}

func (j *joiner) url() string {
	j.mu.Lock()
	defer j.mu.Unlock()
	return strings.TrimRight(j.cfg.Managers[j.manager%len(j.cfg.Managers)], "/")
}

func (j *joiner) nextManager() {
	j.mu.Lock()
	j.manager++
	j.mu.Unlock()
}

// run registers and heartbeats until ctx ends. A manager's refusal (no
// valid token) is final: the operator must act, retrying will not help.
func (j *joiner) run(ctx context.Context) error {
	if j.interval == 0 {
		j.interval = time.Second
	}
	t := time.NewTicker(j.interval)
	defer t.Stop()
	registered := false
	// failed counts the managers that failed since the last tick: after a
	// failure the next manager is tried at once (a manager that died
	// must not cost a host a second of its fencing time), each at most
	// once a tick.
	failed := 0
	retry := func() bool {
		j.nextManager()
		failed++
		return failed < len(j.cfg.Managers)
	}
	for ctx.Err() == nil {
		j.fenceIfCut("")
		if !registered {
			err := j.register(ctx)
			switch {
			case errors.Is(err, errRefused):
				return err
			case err != nil:
				j.log.Warn("register with manager", "manager", j.url(), "err", err)
				if retry() {
					continue
				}
			default:
				registered = true
			}
		}
		if registered {
			j.renewIfDue(ctx)
			switch err := j.heartbeat(ctx); {
			case errors.Is(err, errRefused):
				// Not known (any more) to this manager: register again.
				registered = false
				continue
			case errors.Is(err, errDeclaredDead):
				// Its VMs may run elsewhere by now: kill ours, let the
				// sweep drop what others own, and join again, clean.
				j.fenceIfCut(err.Error())
				j.host.Sweep()
				registered = false
				continue
			case err != nil:
				j.log.Warn("heartbeat", "manager", j.url(), "err", err)
				if retry() {
					continue
				}
			default:
				failed = 0
			}
		}
		select {
		case <-ctx.Done():
		case <-t.C:
			failed = 0
		case <-j.out.wake:
		}
	}
	return nil
}

var (
	errRefused      = errors.New("the manager refused this host")
	errDeclaredDead = errors.New("the managers declared this host dead")
	errConflict     = errors.New("the manager answered 409 conflict")
	errNotFound     = errors.New("the manager answered 404 not found")
)

// register tells the managers where this (joined) host is, after a start
// or a fence; its certificate names it.
func (j *joiner) register(ctx context.Context) error {
	if err := postJSON(ctx, j.http, j.url()+"/v1/hosts/register", j.registration(), nil); err != nil {
		return err
	}
	j.reports.forget() // a new start with this manager: report in full
	j.log.Info("registered with manager", "manager", j.url())
	return nil
}

func (j *joiner) heartbeat(ctx context.Context) error {
	ev := j.out.take()
	if d := j.out.Dropped(); d > j.dropped {
		j.log.Warn("host events dropped: too many were queued", "dropped", d-j.dropped, "total", d)
		j.dropped = d
	}
	url := j.url()
	report := hostproto.Heartbeat{Info: j.host.HostInfo(), Statuses: j.host.Statuses(), Events: ev}
	beat := func(hb hostproto.Heartbeat) (http.Header, error) {
		path := url + "/v1/hosts/" + j.cfg.Name + "/heartbeat"
		if hb.Same != 0 {
			path += "/same"
		}
		return post(ctx, j.http, path, hb, nil)
	}
	hb := j.reports.next(url, report, time.Now())
	sent := time.Now()
	hdr, err := beat(hb)
	if hb.Same != 0 && (errors.Is(err, errConflict) || errors.Is(err, errNotFound)) {
		// This manager does not hold the report (it restarted, or
		// another took the last one), or does not take Same (an older
		// version): send it in full, now.
		j.reports.forget()
		hb = j.reports.next(url, report, time.Now())
		sent = time.Now()
		hdr, err = beat(hb)
	}
	if err != nil {
		j.out.putBack(ev)
		return err
	}
	j.reports.took(url, hb, sent, hdr.Get(hostproto.ReportsHeader) == hostproto.ReportsSame)
	j.acked(sent)
	return nil
}

// hostTLSDir is where a host keeps the credentials QEMU reads for
// migration streams.
func hostTLSDir(dataDir string) string { return filepath.Join(dataDir, "host", "tls") }
