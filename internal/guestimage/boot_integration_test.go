package guestimage

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vigil-project/vigil/internal/guestproto"
	"github.com/vigil-project/vigil/internal/testenv"
)

// TestBootIntegration builds vigil-guest and the default image (downloading
// the kernel package if it is not cached), then boots it twice under TCG on
// the same data disk and checks the agent, HTTP, the data disk and ACPI
// shutdown. Set VIGIL_IMAGE_CACHE to reuse a download cache.
func TestBootIntegration(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test: downloads a kernel and boots QEMU")
	}
	for _, tool := range []string{"qemu-system-x86_64", "qemu-img", "go"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not installed: run make deps (or make test), which installs it", tool)
		}
	}
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Minute)
	defer cancel()

	work := t.TempDir()
	agent := filepath.Join(work, "vigil-guest")
	build := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags=-s -w", "-o", agent, "github.com/vigil-project/vigil/cmd/vigil-guest")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build vigil-guest: %v: %s", err, out)
	}

	cache := os.Getenv("VIGIL_IMAGE_CACHE")
	if cache == "" {
		cache = filepath.Join(os.TempDir(), "vigil-guestimage-test-cache")
	}
	o := Options{Dir: filepath.Join(work, "images", "default"), CacheDir: cache, GuestAgent: agent, Progress: testWriter{t}}
	start := time.Now()
	img, err := Ensure(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("image built in %v: kernel %s", time.Since(start).Round(time.Millisecond), img.KernelVersion)
	again, err := Ensure(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	if !again.BuiltAt.Equal(img.BuiltAt) {
		t.Fatal("Ensure rebuilt an up-to-date image")
	}

	disk := filepath.Join(work, "disk.qcow2")
	if out, err := exec.CommandContext(ctx, "qemu-img", "create", "-f", "qcow2", disk, "256M").CombinedOutput(); err != nil {
		t.Fatalf("qemu-img: %v: %s", err, out)
	}

	first := bootAndCheck(ctx, t, img, disk, "t1", "")
	if !strings.Contains(first.serial, "mounted new filesystem /dev/vda on /data") {
		t.Errorf("first boot did not format and mount /data; serial log:\n%s", first.serial)
	}
	second := bootAndCheck(ctx, t, img, disk, "t2", "vigil.heartbeat=500ms")
	if !strings.Contains(second.serial, "mounted existing filesystem /dev/vda on /data") || strings.Contains(second.serial, "formatting") {
		t.Errorf("second boot did not reuse the filesystem; serial log:\n%s", second.serial)
	}
	if second.bootID == first.bootID {
		t.Error("boot id did not change between boots")
	}
	if second.interval > 800*time.Millisecond {
		t.Errorf("vigil.heartbeat=500ms ignored: interval %v", second.interval)
	}
}

type bootResult struct {
	bootID   string
	interval time.Duration
	serial   string
}

// bootAndCheck boots img once and verifies heartbeat, ping, HTTP and ACPI
// power-off, logging the timings.
func bootAndCheck(ctx context.Context, t *testing.T, img *Image, disk, name, extraCmdline string) bootResult {
	t.Helper()
	// Unix socket paths are limited to 108 bytes; t.TempDir can be longer.
	sockDir, err := os.MkdirTemp("", "vg")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(sockDir)
	agentSock := filepath.Join(sockDir, "agent.sock")
	qmpSock := filepath.Join(sockDir, "qmp.sock")
	serialLog := filepath.Join(sockDir, "serial.log")
	port := freePort(t)

	cmdline := img.Cmdline + " vigil.name=" + name
	if extraCmdline != "" {
		cmdline += " " + extraCmdline
	}
	qemu := exec.CommandContext(ctx, "qemu-system-x86_64",
		"-accel", "tcg", "-machine", "q35", "-m", "128M", "-smp", "1",
		"-nodefaults", "-display", "none", "-no-user-config",
		"-kernel", img.Kernel, "-initrd", img.Initrd, "-append", cmdline,
		"-serial", "file:"+serialLog,
		"-qmp", "unix:"+qmpSock+",server=on,wait=off",
		"-blockdev", "driver=file,filename="+disk+",node-name=disk0-file",
		"-blockdev", "driver=qcow2,file=disk0-file,node-name=disk0",
		"-device", "virtio-blk-pci,drive=disk0",
		"-netdev", fmt.Sprintf("user,id=net0,hostfwd=tcp:127.0.0.1:%d-:80", port),
		"-device", "virtio-net-pci,netdev=net0",
		"-device", "virtio-serial-pci",
		"-chardev", "socket,id=ag,path="+agentSock+",server=on,wait=off",
		"-device", "virtserialport,chardev=ag,name="+guestproto.PortName,
		"-device", "pvpanic-pci",
	)
	var qemuOut strings.Builder
	qemu.Stdout, qemu.Stderr = &qemuOut, &qemuOut
	start := time.Now()
	if err := qemu.Start(); err != nil {
		t.Fatalf("start qemu: %v", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- qemu.Wait() }()
	serial := func() string { b, _ := os.ReadFile(serialLog); return string(b) }
	defer func() {
		if qemu.ProcessState == nil {
			qemu.Process.Kill()
			<-exited
		}
		if t.Failed() {
			t.Logf("qemu output: %s\nserial log:\n%s", qemuOut.String(), serial())
		}
	}()

	conn := dialRetry(ctx, t, agentSock)
	defer conn.Close()
	msgs := make(chan guestproto.Message, 16)
	go func() {
		defer close(msgs)
		dec := guestproto.NewDecoder(conn)
		for {
			m, err := dec.Decode()
			if errors.Is(err, guestproto.ErrMalformed) || errors.Is(err, guestproto.ErrVersion) {
				continue
			}
			if err != nil {
				return
			}
			msgs <- m
		}
	}()
	next := func(typ string, timeout time.Duration) guestproto.Message {
		t.Helper()
		deadline := time.After(timeout)
		for {
			select {
			case m, ok := <-msgs:
				if !ok {
					t.Fatalf("agent channel closed waiting for %s", typ)
				}
				if m.Type == typ {
					return m
				}
			case <-deadline:
				t.Fatalf("no %s within %v", typ, timeout)
			}
		}
	}

	hb1 := next(guestproto.TypeHeartbeat, 60*time.Second)
	firstHB := time.Since(start)
	hb2 := next(guestproto.TypeHeartbeat, 10*time.Second)
	interval := hb2.Heartbeat.SentAt.Sub(hb1.Heartbeat.SentAt)
	if hb1.Heartbeat.Seq != 1 || hb2.Heartbeat.Seq != 2 {
		t.Errorf("heartbeat seqs %d, %d; want 1, 2", hb1.Heartbeat.Seq, hb2.Heartbeat.Seq)
	}
	if hb1.Heartbeat.BootID == "" || hb1.Heartbeat.MemTotalBytes == 0 || hb1.Heartbeat.UptimeSeconds <= 0 {
		t.Errorf("incomplete heartbeat %+v", *hb1.Heartbeat)
	}

	pingAt := time.Now()
	if err := guestproto.NewEncoder(conn).Encode(guestproto.Message{Type: guestproto.TypePing, ID: "it-" + name}); err != nil {
		t.Fatal(err)
	}
	if pong := next(guestproto.TypePong, 10*time.Second); pong.ID != "it-"+name {
		t.Errorf("pong id %q", pong.ID)
	}
	rtt := time.Since(pingAt)

	body := testenv.HTTPGet(ctx, t, fmt.Sprintf("http://127.0.0.1:%d/", port))
	if !strings.Contains(body, hb1.Heartbeat.BootID) || !strings.Contains(body, name) {
		t.Errorf("index.html lacks boot id %s or name %s: %q", hb1.Heartbeat.BootID, name, body)
	}

	powerdownAt := time.Now()
	qmpPowerdown(ctx, t, qmpSock)
	select {
	case err := <-exited:
		if err != nil {
			t.Errorf("qemu exited with %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("guest did not power off within 30s of system_powerdown")
	}
	shutdown := time.Since(powerdownAt)
	log := serial()
	if !strings.Contains(log, "vigil: shutting down") {
		t.Error("shutdown actions did not run")
	}
	t.Logf("boot %s: first heartbeat %v after qemu start (guest uptime %.2fs), heartbeat interval %v, ping rtt %v, powerdown→exit %v",
		name, firstHB.Round(time.Millisecond), hb1.Heartbeat.UptimeSeconds, interval.Round(time.Millisecond),
		rtt.Round(time.Microsecond), shutdown.Round(time.Millisecond))
	return bootResult{bootID: hb1.Heartbeat.BootID, interval: interval, serial: log}
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func dialRetry(ctx context.Context, t *testing.T, path string) net.Conn {
	t.Helper()
	for {
		c, err := net.Dial("unix", path)
		if err == nil {
			return c
		}
		select {
		case <-ctx.Done():
			t.Fatalf("dial %s: %v", path, err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// qmpPowerdown presses the virtual ACPI power button.
func qmpPowerdown(ctx context.Context, t *testing.T, path string) {
	t.Helper()
	c := dialRetry(ctx, t, path)
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	r := bufio.NewReader(c)
	if _, err := r.ReadBytes('\n'); err != nil { // greeting
		t.Fatalf("qmp greeting: %v", err)
	}
	for _, cmd := range []string{"qmp_capabilities", "system_powerdown"} {
		if _, err := fmt.Fprintf(c, `{"execute":%q}`+"\n", cmd); err != nil {
			t.Fatalf("qmp %s: %v", cmd, err)
		}
		for {
			line, err := r.ReadBytes('\n')
			if err != nil {
				t.Fatalf("qmp %s: %v", cmd, err)
			}
			var resp struct {
				Return json.RawMessage `json:"return"`
				Error  *struct {
					Desc string `json:"desc"`
				} `json:"error"`
			}
			if json.Unmarshal(line, &resp) != nil {
				continue
			}
			if resp.Error != nil {
				t.Fatalf("qmp %s: %s", cmd, resp.Error.Desc)
			}
			if resp.Return != nil {
				break // events are skipped until the reply arrives
			}
		}
	}
}

// testWriter sends Build progress to the test log.
type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}
