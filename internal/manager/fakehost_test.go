package manager

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/events"
	"github.com/vigil-project/vigil/internal/hostproto"
	"github.com/vigil-project/vigil/internal/imagestore"
	"github.com/vigil-project/vigil/internal/pki"
	"github.com/vigil-project/vigil/internal/remotehost"
	"github.com/vigil-project/vigil/internal/store"
)

// The manager's unit tests run against a fake host agent, in process
// (LocalHost) or, when VIGIL_TEST_HOST=remote, behind the real host
// protocol over HTTP (remotehost, hostproto.Serve) with heartbeats:
// TestSuiteOverTheWire runs the whole suite that second way, so the manager
// must behave the same with either, errors included.
var remoteHosts = os.Getenv("VIGIL_TEST_HOST") == "remote"

// TestSuiteOverTheWire re-runs every other test of this package with the
// fake host behind HTTP.
func TestSuiteOverTheWire(t *testing.T) {
	if remoteHosts {
		t.Skip("this is the run over the wire")
	}
	args := []string{"-test.run", "^Test", "-test.skip", "^TestSuiteOverTheWire$", "-test.count", "1"}
	if testing.Short() {
		args = append(args, "-test.short")
	}
	if testing.Verbose() {
		args = append(args, "-test.v")
	}
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), "VIGIL_TEST_HOST=remote")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("the suite over HTTP failed: %v\n%s", err, out)
	}
	t.Logf("the suite over HTTP passed:\n%s", lastLines(string(out), 3))
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// fakeHost stands in for a host agent in unit tests: it records calls and
// keeps a running flag per VM, and can be told to fail.
type fakeHost struct {
	name     string
	mu       sync.Mutex
	vms      map[string]bool // name -> running
	paused   map[string]bool
	saved    map[string]bool // has a suspend state file
	failNext map[string]error
	// before runs, if set for an operation, as the host starts it (outside
	// the lock), then is forgotten.
	before    map[string]func()
	calls     []string
	stopDelay time.Duration
	pool      string // storage pool id it reports
	nextPort  int
	// changed, if set, is told of every change (to send a heartbeat).
	changed func()
	// networks is what SetNetworks last gave.
	networks []hostproto.NetworkSpec
	// protected are the VMs it checkpoints (Protect), by generation.
	protected map[string]hostproto.ProtectRequest
}

func newFakeHost() *fakeHost {
	return &fakeHost{name: "h1", vms: map[string]bool{}, paused: map[string]bool{}, saved: map[string]bool{}, failNext: map[string]error{}, before: map[string]func(){}}
}

var _ hostproto.Handler = (*fakeHost)(nil)

func (h *fakeHost) info() api.Host {
	h.mu.Lock()
	defer h.mu.Unlock()
	return api.Host{Name: h.name, State: "up", MemoryBytes: 64 << 30, CPUs: 16, StoragePool: h.pool, VMs: len(h.vms)}
}

func (h *fakeHost) statuses() []hostproto.VMStatus {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []hostproto.VMStatus
	for name := range h.vms {
		out = append(out, h.statusLocked(name))
	}
	return out
}

func (h *fakeHost) statusLocked(name string) hostproto.VMStatus {
	running := h.vms[name]
	st := hostproto.VMStatus{Name: name, Running: running, SavedState: h.saved[name]}
	if pr, ok := h.protected[name]; ok {
		st.Protection = &hostproto.ProtectionStatus{Secondary: pr.Secondary, Generation: pr.Generation, State: "syncing"}
	}
	if running {
		st.PID = 42
		st.RunState = "running"
		if h.paused[name] {
			st.RunState = "paused"
		}
	}
	return st
}

// set changes a VM's running flag as a test wants it, and reports it.
func (h *fakeHost) set(name string, running bool) {
	h.mu.Lock()
	h.vms[name] = running
	h.mu.Unlock()
	h.notify()
}

func (h *fakeHost) notify() {
	if h.changed != nil {
		h.changed()
	}
}

// record notes a call and fails it if a failure was set for op.
func (h *fakeHost) record(op, name string) error {
	h.mu.Lock()
	f := h.before[op]
	delete(h.before, op)
	h.mu.Unlock()
	if f != nil {
		f()
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.calls = append(h.calls, op+" "+name)
	if err := h.failNext[op]; err != nil {
		delete(h.failNext, op)
		return err
	}
	return nil
}

// mutate runs f under the lock after a successful record, and reports it.
func (h *fakeHost) mutate(op, name string, f func()) (hostproto.None, error) {
	if err := h.record(op, name); err != nil {
		return hostproto.None{}, err
	}
	h.mu.Lock()
	f()
	h.mu.Unlock()
	h.notify()
	return hostproto.None{}, nil
}

func (h *fakeHost) Info(context.Context, hostproto.None) (api.Host, error) { return h.info(), nil }
func (h *fakeHost) Create(_ context.Context, r hostproto.CreateRequest) (hostproto.CreateResult, error) {
	var port int
	_, err := h.mutate("create", r.Spec.Name, func() {
		h.vms[r.Spec.Name] = false
		h.nextPort++
		port = 40000 + h.nextPort
		for slices.Contains(r.AvoidPorts, port) {
			port++
		}
	})
	return hostproto.CreateResult{HostPort: port}, err
}
func (h *fakeHost) Attach(_ context.Context, s hostproto.VMSpec) (hostproto.None, error) {
	return h.mutate("attach", s.Name, func() { h.vms[s.Name] = false })
}
func (h *fakeHost) Start(_ context.Context, r hostproto.VMRef) (hostproto.None, error) {
	return h.mutate("start", r.VM, func() { h.vms[r.VM] = true })
}
func (h *fakeHost) Stop(ctx context.Context, r hostproto.StopRequest) (hostproto.None, error) {
	if err := h.record("stop", r.VM); err != nil {
		return hostproto.None{}, err
	}
	h.mu.Lock()
	delay := h.stopDelay
	h.mu.Unlock()
	select {
	case <-time.After(delay):
	case <-ctx.Done():
		return hostproto.None{}, ctx.Err()
	}
	h.mu.Lock()
	h.vms[r.VM], h.paused[r.VM] = false, false
	h.mu.Unlock()
	h.notify()
	return hostproto.None{}, nil
}
func (h *fakeHost) Restart(_ context.Context, r hostproto.VMRef) (hostproto.None, error) {
	return h.mutate("restart", r.VM, func() { h.vms[r.VM], h.paused[r.VM] = true, false })
}
func (h *fakeHost) Delete(_ context.Context, r hostproto.VMRef) (hostproto.None, error) {
	return h.mutate("delete", r.VM, func() { delete(h.vms, r.VM) })
}
func (h *fakeHost) Status(_ context.Context, r hostproto.VMRef) (hostproto.VMStatus, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if _, ok := h.vms[r.VM]; !ok {
		return hostproto.VMStatus{}, fmt.Errorf("%s: %w", r.VM, hostproto.ErrUnknownVM)
	}
	return h.statusLocked(r.VM), nil
}
func (h *fakeHost) Pause(_ context.Context, r hostproto.VMRef) (hostproto.None, error) {
	return h.mutate("pause", r.VM, func() { h.paused[r.VM] = true })
}
func (h *fakeHost) Resume(_ context.Context, r hostproto.VMRef) (hostproto.None, error) {
	return h.mutate("resume", r.VM, func() { h.paused[r.VM], h.saved[r.VM], h.vms[r.VM] = false, false, true })
}
func (h *fakeHost) Suspend(_ context.Context, r hostproto.VMRef) (hostproto.SaveResult, error) {
	if _, err := h.mutate("suspend", r.VM, func() { h.paused[r.VM], h.saved[r.VM], h.vms[r.VM] = false, true, false }); err != nil {
		return hostproto.SaveResult{}, err
	}
	return hostproto.SaveResult{Bytes: 1 << 20, Duration: time.Millisecond}, nil
}
func (h *fakeHost) DiscardState(_ context.Context, r hostproto.VMRef) (hostproto.None, error) {
	return h.mutate("discard", r.VM, func() { h.saved[r.VM] = false })
}
func (h *fakeHost) SnapshotCreate(_ context.Context, r hostproto.SnapshotRequest) (hostproto.SaveResult, error) {
	return hostproto.SaveResult{}, h.record("snapshot", r.VM+"/"+r.Snapshot)
}
func (h *fakeHost) SnapshotRevert(_ context.Context, r hostproto.SnapshotRequest) (hostproto.None, error) {
	return hostproto.None{}, h.record("revert", r.VM+"/"+r.Snapshot)
}
func (h *fakeHost) SnapshotDelete(_ context.Context, r hostproto.SnapshotRequest) (hostproto.None, error) {
	return hostproto.None{}, h.record("snapdelete", r.VM+"/"+r.Snapshot)
}
func (h *fakeHost) SnapshotSpace(context.Context, hostproto.VMRef) (hostproto.Space, error) {
	return hostproto.Space{Bytes: map[string]int64{}}, nil
}
func (h *fakeHost) Exec(_ context.Context, r hostproto.ExecRequest) (api.ExecResult, error) {
	return api.ExecResult{Output: r.Exec.Command}, h.record("exec", r.VM)
}
func (h *fakeHost) SetHealth(_ context.Context, r hostproto.HealthRequest) (hostproto.None, error) {
	return hostproto.None{}, h.record("sethealth", r.VM)
}
func (h *fakeHost) Configure(_ context.Context, r hostproto.ConfigureRequest) (hostproto.None, error) {
	what := r.VM
	if r.Eject {
		what += "/eject"
	}
	if r.CloudInit != nil {
		what += "/cloud-init"
	}
	return hostproto.None{}, h.record("configure", what)
}

// fakePNG is what the fake host's screen shows.
var fakePNG = []byte("\x89PNG\r\n\x1a\nfake screen")

func (h *fakeHost) Screenshot(_ context.Context, r hostproto.VMRef) (hostproto.ScreenshotResult, error) {
	return hostproto.ScreenshotResult{PNG: fakePNG}, h.record("screenshot", r.VM)
}

// Usage answers two samples a second apart: one second of CPU and 4 KiB
// written to disk.
func (h *fakeHost) Usage(_ context.Context, r hostproto.VMRef) (api.UsageHistory, error) {
	t := time.Date(2026, 12, 2, 10, 0, 0, 0, time.UTC)
	return api.UsageHistory{VM: r.VM, Host: h.name, Samples: []api.UsageSample{
		{Time: t, CPUSeconds: 1, DiskWriteBytes: 4096},
		{Time: t.Add(time.Second), CPUSeconds: 2, DiskWriteBytes: 8192},
	}}, h.record("usage", r.VM)
}

// VNC answers with an echo: what the client writes comes back.
func (h *fakeHost) VNC(_ context.Context, r hostproto.VMRef) (io.ReadWriteCloser, error) {
	if err := h.record("vnc", r.VM); err != nil {
		return nil, err
	}
	a, b := net.Pipe()
	go func() { io.Copy(b, b); b.Close() }()
	return a, nil
}

func (h *fakeHost) Fault(_ context.Context, r hostproto.FaultRequest) (hostproto.None, error) {
	return hostproto.None{}, h.record("fault", r.VM+"/"+r.Kind)
}
func (h *fakeHost) MigrateIn(_ context.Context, r hostproto.MigrateInRequest) (hostproto.MigrateInResult, error) {
	return hostproto.MigrateInResult{Port: 4444}, h.record("migrate-in", r.Spec.Name)
}
func (h *fakeHost) MigrateOut(_ context.Context, r hostproto.MigrateOutRequest) (hostproto.Migration, error) {
	return hostproto.Migration{}, h.record("migrate-out", r.VM)
}
func (h *fakeHost) MigrateFinish(_ context.Context, r hostproto.VMRef) (hostproto.None, error) {
	return hostproto.None{}, h.record("migrate-finish", r.VM)
}
func (h *fakeHost) MigrateAbort(_ context.Context, r hostproto.VMRef) (hostproto.None, error) {
	return hostproto.None{}, h.record("migrate-abort", r.VM)
}
func (h *fakeHost) SetNetworks(_ context.Context, r hostproto.NetworksRequest) (hostproto.None, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.networks = r.Networks
	return hostproto.None{}, nil
}
func (h *fakeHost) Console(_ context.Context, r hostproto.ConsoleRequest, w io.Writer) error {
	_, err := io.WriteString(w, "console of "+r.VM+"\n")
	return err
}

func (h *fakeHost) callsString() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return strings.Join(h.calls, ",")
}

func (h *fakeHost) called(call string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, c := range h.calls {
		if c == call {
			return true
		}
	}
	return false
}

func (h *fakeHost) exists(name string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	_, ok := h.vms[name]
	return ok
}

// onStart makes f run as the host starts the next op.
func (h *fakeHost) onStart(op string, f func()) {
	h.mu.Lock()
	h.before[op] = f
	h.mu.Unlock()
}

func (h *fakeHost) fail(op string, err error) {
	h.mu.Lock()
	h.failNext[op] = err
	h.mu.Unlock()
}

// testIdentity is a cluster CA and a manager certificate for tests.
func testIdentity(t testing.TB) *Identity {
	t.Helper()
	ca, _, err := pki.NewCA("test")
	if err != nil {
		t.Fatal(err)
	}
	id, err := NewIdentity(ca, "m-test", "127.0.0.1:0", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// hostTLS is the server side of a host agent named name, with a
// certificate from id's CA: mutual TLS, managers only.
func hostTLS(t testing.TB, id *Identity, name string) *tls.Config {
	t.Helper()
	cert, key, err := id.CA.Issue(pki.Profile{Role: pki.RoleHost, Name: name, IPs: []net.IP{net.IPv4(127, 0, 0, 1)}})
	if err != nil {
		t.Fatal(err)
	}
	h := &pki.Holder{}
	if err := h.Set(cert, key, id.CA.CertPEM); err != nil {
		t.Fatal(err)
	}
	c := pki.ServerConfig(h, id.CA.Pool(), false)
	c.VerifyConnection = pki.RequirePeer(pki.RoleManager, "")
	return c
}

// asHost makes the fake a Host for the manager: in process, or (in the
// run over the wire) a remote host over mutual TLS, with heartbeats.
func asHost(t testing.TB, id *Identity, h *fakeHost) Host {
	t.Helper()
	if !remoteHosts {
		return LocalHost(h.name, h)
	}
	srv := httptest.NewUnstartedServer(hostproto.Serve(h, nil))
	srv.TLS = hostTLS(t, id, h.name)
	srv.StartTLS()
	t.Cleanup(srv.Close)
	rh := remotehost.New(h.name, strings.TrimPrefix(srv.URL, "https://"), id.HostClientTLS(h.name))
	beat := func() {
		rh.Heartbeat(hostproto.Heartbeat{Info: h.info(), Statuses: h.statuses()}, 0, time.Now())
	}
	h.changed = beat
	beat()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(200 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				beat()
			}
		}
	}()
	t.Cleanup(func() { cancel(); <-done })
	return rh
}

// newTestManager returns a leading manager with its workers running, on a
// real embedded etcd, with one fake host h1.
func newTestManager(t testing.TB) (*Manager, *fakeHost) {
	t.Helper()
	ms, h := newTestManagers(t, 1)
	return ms[0], h
}

// newTestManagers starts n managers on one etcd, each reaching the same
// fake host; the first leads.
func newTestManagers(t testing.TB, n int) ([]*Manager, *fakeHost) {
	t.Helper()
	ms, h, _ := newTestManagersOn(t, n)
	return ms, h
}

// newTestManagersOn is newTestManagers, with the etcd they share (for
// tests that stop it).
func newTestManagersOn(t testing.TB, n int) ([]*Manager, *fakeHost, *store.Embedded) {
	t.Helper()
	e, err := store.StartEmbedded(context.Background(), t.TempDir(), nil)
	if err != nil {
		t.Fatalf("start etcd: %v", err)
	}
	t.Cleanup(e.Close)
	h := newFakeHost()
	id := testIdentity(t)
	var ms []*Manager
	for i := 0; i < n; i++ {
		imgs, err := imagestore.Open(t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		m := New(Config{
			Name:  fmt.Sprintf("m%d", i),
			Store: store.New(e.Client(), "/test/"), Host: asHost(t, id, h), Events: events.New(1000), Identity: id,
			Limits: Limits{MaxMemoryBytes: 4 << 30, MaxCPUs: 8}, Images: imgs,
		})
		m.SetLeader(i == 0)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { defer close(done); m.Run(ctx) }()
		t.Cleanup(func() { cancel(); <-done })
		ms = append(ms, m)
	}
	return ms, h, e
}

// putRecord overwrites a VM's record, as a test sets the scene.
func putRecord(t *testing.T, m *Manager, r record) {
	t.Helper()
	if err := m.store.Put(context.Background(), vmKey(r.Spec.Name), r); err != nil {
		t.Fatal(err)
	}
}

// authed is the manager's API with a token of role on every request.
func authed(t testing.TB, m *Manager, role string) http.Handler {
	t.Helper()
	// A fuzz worker starts its own etcd while others fuzz: the first
	// writes can time out on a loaded machine.
	var tok api.TokenCreated
	var err error
	for try := 0; try < 5; try++ {
		if tok, err = m.CreateToken(context.Background(), api.TokenCreateRequest{Name: "test-" + role + "-" + randomHex(3), Role: role}, "test"); err == nil {
			break
		}
		time.Sleep(time.Second)
	}
	if err != nil {
		t.Fatalf("create a token: %v", err)
	}
	h := m.Handler()
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		r.Header.Set("Authorization", "Bearer "+tok.Token)
		h.ServeHTTP(w, r)
	})
}

func (h *fakeHost) Protect(_ context.Context, r hostproto.ProtectRequest) (hostproto.None, error) {
	if err := h.record("protect", r.VM+" to "+r.Secondary); err != nil {
		return hostproto.None{}, err
	}
	h.mu.Lock()
	if h.protected == nil {
		h.protected = map[string]hostproto.ProtectRequest{}
	}
	h.protected[r.VM] = r
	h.mu.Unlock()
	h.notify()
	return hostproto.None{}, nil
}
func (h *fakeHost) Unprotect(_ context.Context, r hostproto.VMRef) (hostproto.None, error) {
	if err := h.record("unprotect", r.VM); err != nil {
		return hostproto.None{}, err
	}
	h.mu.Lock()
	delete(h.protected, r.VM)
	h.mu.Unlock()
	h.notify()
	return hostproto.None{}, nil
}
func (h *fakeHost) Standby(_ context.Context, r hostproto.StandbyRequest) (hostproto.None, error) {
	return hostproto.None{}, h.record("standby", r.VM+" from "+r.Primary)
}
func (h *fakeHost) StandbyDrop(_ context.Context, r hostproto.VMRef) (hostproto.None, error) {
	return hostproto.None{}, h.record("standby-drop", r.VM)
}
func (h *fakeHost) Activate(_ context.Context, r hostproto.ActivateRequest) (hostproto.ActivateResult, error) {
	_, err := h.mutate("activate", r.VM, func() { h.vms[r.VM] = true })
	return hostproto.ActivateResult{Seq: 7, TakenAt: time.Now()}, err
}
func (h *fakeHost) Checkpoints(_ context.Context, r hostproto.CheckpointsRequest) (io.ReadWriteCloser, error) {
	return nil, fmt.Errorf("checkpoints come from hosts, not from a manager")
}
