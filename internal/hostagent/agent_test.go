package hostagent

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vigil-project/vigil/internal/hostproto"
)

func newTestAgent(t *testing.T) *Agent {
	t.Helper()
	for _, bin := range []string{"qemu-img", "qemu-system-x86_64"} {
		if _, err := exec.LookPath(bin); err != nil {
			if testing.Short() {
				t.Skipf("%s not installed", bin)
			}
			t.Fatalf("%s not installed: run make deps", bin)
		}
	}
	a, err := New(Config{Name: "h1", DataDir: t.TempDir(), Accel: "tcg",
		Image: Image{Kernel: "/k", Initrd: "/i", Cmdline: "console=ttyS0"}})
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func spec(name string, disk int64) hostproto.VMSpec {
	return hostproto.VMSpec{Name: name, UUID: "u", MemoryBytes: 128 << 20, CPUs: 1, DiskBytes: disk, HostPort: 8080}
}

func TestCreateAndDelete(t *testing.T) {
	a := newTestAgent(t)
	ctx := context.Background()
	if _, err := a.Create(ctx, hostproto.CreateRequest{Spec: spec("web1", 64<<20)}); err != nil {
		t.Fatalf("create: %v", err)
	}
	dir := a.vmDir("web1")
	for _, f := range []string{"disk.qcow2", "spec.json"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			t.Fatalf("%s missing after create: %v", f, err)
		}
	}
	if _, err := a.Create(ctx, hostproto.CreateRequest{Spec: spec("web1", 64<<20)}); err == nil {
		t.Fatal("second create of the same name succeeded")
	}
	if st, err := a.Status(ctx, hostproto.VMRef{VM: "web1"}); err != nil || st.Running {
		t.Fatalf("status of a created vm = %+v, %v", st, err)
	}
	if _, err := a.Stop(ctx, hostproto.StopRequest{VM: "web1", Force: true}); !errors.Is(err, ErrNotRunning) {
		t.Fatalf("stop of a stopped vm: %v, want ErrNotRunning", err)
	}
	if _, err := a.Delete(ctx, hostproto.VMRef{VM: "web1"}); err != nil {
		t.Fatalf("delete: %v", err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("vm dir still there: %v", err)
	}
	if _, err := a.Delete(ctx, hostproto.VMRef{VM: "web1"}); err != nil {
		t.Fatalf("second delete should be a no-op: %v", err)
	}
	if _, err := a.Status(ctx, hostproto.VMRef{VM: "web1"}); !errors.Is(err, ErrUnknownVM) {
		t.Fatalf("status after delete: %v", err)
	}
}

func TestFailedCreateLeavesNothing(t *testing.T) {
	a := newTestAgent(t)
	_, err := a.Create(context.Background(), hostproto.CreateRequest{Spec: spec("web1", -1)}) // qemu-img refuses the size
	if err == nil {
		t.Fatal("create with an impossible disk succeeded")
	}
	if _, err := os.Stat(a.vmDir("web1")); !os.IsNotExist(err) {
		t.Fatalf("failed create left its directory: %v", err)
	}
	if _, err := a.Status(context.Background(), hostproto.VMRef{VM: "web1"}); !errors.Is(err, ErrUnknownVM) {
		t.Fatalf("failed create left the vm known: %v", err)
	}
}

func TestRecoverLoadsSpecsWithoutProcesses(t *testing.T) {
	a := newTestAgent(t)
	ctx := context.Background()
	if _, err := a.Create(ctx, hostproto.CreateRequest{Spec: spec("web1", 64<<20)}); err != nil {
		t.Fatal(err)
	}
	os.MkdirAll(filepath.Join(a.cfg.DataDir, "vms", "junk"), 0o755) // no spec.json: skipped

	b, err := New(a.cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Recover(ctx); err != nil {
		t.Fatalf("recover: %v", err)
	}
	if st, err := b.Status(ctx, hostproto.VMRef{VM: "web1"}); err != nil || st.Running {
		t.Fatalf("recovered vm = %+v, %v; want known and not running", st, err)
	}
	if _, err := b.Status(ctx, hostproto.VMRef{VM: "junk"}); !errors.Is(err, ErrUnknownVM) {
		t.Fatalf("a directory without spec was loaded: %v", err)
	}
}

// syncBuffer is a bytes.Buffer safe for one writer and one reader.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func TestConsoleFollowsAcrossReboots(t *testing.T) {
	a := newTestAgent(t)
	ctx := context.Background()
	if _, err := a.Create(ctx, hostproto.CreateRequest{Spec: spec("web1", 64<<20)}); err != nil {
		t.Fatal(err)
	}
	log, _ := a.SerialLog("web1")
	var out bytes.Buffer
	if err := a.Console(ctx, hostproto.ConsoleRequest{VM: "web1"}, &out); err != nil || out.Len() != 0 {
		t.Fatalf("console of a never-started vm = %q, %v", out.String(), err)
	}
	os.WriteFile(log, []byte("boot one\n"), 0o644)

	fctx, cancel := context.WithCancel(ctx)
	var buf syncBuffer
	done := make(chan error)
	go func() { done <- a.Console(fctx, hostproto.ConsoleRequest{VM: "web1", Follow: true}, &buf) }()
	waitUntil(t, func() bool { return strings.Contains(buf.String(), "boot one") })

	f, _ := os.OpenFile(log, os.O_APPEND|os.O_WRONLY, 0)
	f.WriteString("more of boot one\n")
	f.Close()
	waitUntil(t, func() bool { return strings.Contains(buf.String(), "more of boot one") })

	// A new boot rotates the log, as qemu.Start does.
	os.Rename(log, log+".1")
	os.WriteFile(log, []byte("boot two\n"), 0o644)
	waitUntil(t, func() bool { return strings.Contains(buf.String(), "boot two") })
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("console --follow: %v", err)
	}
	if got := buf.String(); got != "boot one\nmore of boot one\nboot two\n" {
		t.Fatalf("followed console = %q", got)
	}
}

func waitUntil(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 3s")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestCreatePicksAHostPort: a VM without a port gets one free on this
// host, none the cluster's other VMs hold (the manager passes those).
func TestCreatePicksAHostPort(t *testing.T) {
	a := newTestAgent(t)
	ctx := context.Background()
	s := spec("p1", 64<<20)
	s.HostPort = 0
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	taken := l.Addr().(*net.TCPAddr).Port
	res, err := a.Create(ctx, hostproto.CreateRequest{Spec: s, AvoidPorts: []int{taken + 1}})
	if err != nil {
		t.Fatal(err)
	}
	if res.HostPort == 0 || res.HostPort == taken || res.HostPort == taken+1 {
		t.Fatalf("port %d (taken %d, avoided %d)", res.HostPort, taken, taken+1)
	}
	v, _ := a.get("p1")
	if v.spec.HostPort != res.HostPort || v.machine.HostPort != res.HostPort {
		t.Fatalf("vm keeps port %d/%d, answered %d", v.spec.HostPort, v.machine.HostPort, res.HostPort)
	}
	// A port given in the spec is kept (a VM moving between hosts).
	s2 := spec("p2", 64<<20)
	s2.HostPort = 40123
	if res, err := a.Create(ctx, hostproto.CreateRequest{Spec: s2}); err != nil || res.HostPort != 40123 {
		t.Fatalf("given port: %+v, %v", res, err)
	}
}
