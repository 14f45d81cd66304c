package agent

import (
	"bytes"
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/atomicfile"
	"github.com/vigil-project/vigil/internal/hostagent"
	"github.com/vigil-project/vigil/internal/hostproto"
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
	ImageDir   string
	GuestAgent string
	Progress   func(string)
	Logger     *slog.Logger
	Ready      func(addr string)
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

	out := &outbox{wake: make(chan struct{}, 1)}
	host, err := newHostAgent(ctx, hostSetup{name: cfg.Name, dataDir: cfg.DataDir, accel: cfg.Accel, imageDir: cfg.ImageDir,
		guestAgent: cfg.GuestAgent, progress: cfg.Progress, log: log, notify: out.add, storagePool: cfg.StoragePool,
		// Live migrations come in on the address the managers reach us at.
		migrationHost: ln.Addr().(*net.TCPAddr).IP.String()})
	if err != nil {
		return err
	}
	if err := host.Recover(ctx); err != nil {
		return err
	}
	j := &joiner{cfg: cfg, log: log.With("host", cfg.Name), addr: ln.Addr().String(), host: host, out: out,
		secretPath: filepath.Join(cfg.DataDir, "host-secret"), http: &http.Client{Timeout: 3 * time.Second}, lastAck: time.Now()}
	j.loadSecret()

	srv := newServer(hostAPI(host, j.currentSecret, log), context.Background())
	go srv.Serve(ln)
	hostCtx, stopHost := context.WithCancel(context.Background())
	hostDone := make(chan error, 1)
	go func() { hostDone <- host.Run(hostCtx) }()
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

// hostAPI serves the host operations to the manager this host joined:
// every request must carry the secret it was given at registration (secret
// returns "" until then, and then nothing is accepted).
func hostAPI(h hostproto.Handler, secret func() string, log *slog.Logger) http.Handler {
	ops := hostproto.Serve(h, log)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		want := secret()
		got := r.Header.Get("Authorization")
		if want == "" || subtle.ConstantTimeCompare([]byte(got), []byte("Bearer "+want)) != 1 {
			http.Error(w, "not authorized: this host agent answers only the manager it joined", http.StatusUnauthorized)
			return
		}
		ops.ServeHTTP(w, r)
	})
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
	cfg        HostConfig
	log        *slog.Logger
	addr       string
	host       joinedHost
	interval   time.Duration // between heartbeats (default a second)
	out        *outbox
	http       *http.Client
	secretPath string

	mu      sync.Mutex
	secret  string
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

func (j *joiner) currentSecret() string {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.secret
}

func (j *joiner) loadSecret() {
	if b, err := os.ReadFile(j.secretPath); err == nil {
		j.secret = strings.TrimSpace(string(b))
	}
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
	for ctx.Err() == nil {
		j.fenceIfCut("")
		if !registered {
			err := j.register(ctx)
			switch {
			case errors.Is(err, errRefused):
				return err
			case err != nil:
				j.log.Warn("register with manager", "manager", j.url(), "err", err)
				j.nextManager()
			default:
				registered = true
			}
		}
		if registered {
			switch err := j.heartbeat(ctx); {
			case errors.Is(err, errUnauthorized):
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
				j.nextManager()
			}
		}
		select {
		case <-ctx.Done():
		case <-t.C:
		case <-j.out.wake:
		}
	}
	return nil
}

var (
	errUnauthorized = errors.New("the manager does not know this host")
	errRefused      = errors.New("the manager refused this host")
	errDeclaredDead = errors.New("the managers declared this host dead")
)

func (j *joiner) post(ctx context.Context, path string, body, out any, auth string) error {
	b, _ := json.Marshal(body)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, j.url()+path, bytes.NewReader(b))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	if auth != "" {
		req.Header.Set("Authorization", "Bearer "+auth)
	}
	resp, err := j.http.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusUnauthorized && path != "/v1/hosts/register" {
		return errUnauthorized
	}
	if resp.StatusCode == http.StatusGone {
		return errDeclaredDead
	}
	if resp.StatusCode == http.StatusUnauthorized {
		var e struct {
			Error string `json:"error"`
		}
		json.NewDecoder(resp.Body).Decode(&e)
		return fmt.Errorf("%w: %s", errRefused, e.Error)
	}
	if resp.StatusCode >= 300 {
		var e struct {
			Error string `json:"error"`
		}
		json.NewDecoder(resp.Body).Decode(&e)
		return fmt.Errorf("%s: %s", resp.Status, e.Error)
	}
	if out != nil {
		return json.NewDecoder(resp.Body).Decode(out)
	}
	return nil
}

// register presents the join token, or the secret from an earlier
// registration (so a restarted host needs no new token).
func (j *joiner) register(ctx context.Context) error {
	tok := j.cfg.JoinToken
	if s := j.currentSecret(); s != "" {
		tok = s
	}
	var reg hostproto.Registered
	fence := j.cfg.FenceAfter.Milliseconds()
	err := j.post(ctx, "/v1/hosts/register", hostproto.Register{Name: j.cfg.Name, Token: tok, Addr: j.addr, Info: j.host.HostInfo(), FenceAfterMS: fence}, &reg, "")
	if err != nil && tok != j.cfg.JoinToken && j.cfg.JoinToken != "" {
		// The manager forgot us (a new cluster): try the join token.
		err = j.post(ctx, "/v1/hosts/register", hostproto.Register{Name: j.cfg.Name, Token: j.cfg.JoinToken, Addr: j.addr, Info: j.host.HostInfo(), FenceAfterMS: fence}, &reg, "")
	}
	if err != nil {
		return err
	}
	j.mu.Lock()
	j.secret = reg.Secret
	j.mu.Unlock()
	if err := atomicfile.WriteFile(j.secretPath, []byte(reg.Secret+"\n"), 0o600); err != nil {
		j.log.Warn("keep host secret", "err", err)
	}
	j.log.Info("registered with manager", "manager", j.url())
	return nil
}

func (j *joiner) heartbeat(ctx context.Context) error {
	ev := j.out.take()
	hb := hostproto.Heartbeat{Info: j.host.HostInfo(), Statuses: j.host.Statuses(), Events: ev}
	sent := time.Now()
	if err := j.post(ctx, "/v1/hosts/"+j.cfg.Name+"/heartbeat", hb, nil, j.currentSecret()); err != nil {
		j.out.putBack(ev)
		return err
	}
	j.acked(sent)
	return nil
}
