package hostagent

import (
	"context"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/hostproto"
	"github.com/vigil-project/vigil/internal/qga"
	"github.com/vigil-project/vigil/internal/qga/qgatest"
)

func TestParseBootID(t *testing.T) {
	for _, tt := range []struct {
		in, want string
		ok       bool
	}{
		{"3f1c1b8e-0b5e-4a59-9d1c-2f7c8e1a9b01\n", "3f1c1b8e-0b5e-4a59-9d1c-2f7c8e1a9b01", true},
		{"  3f1c1b8e-0b5e-4a59-9d1c-2f7c8e1a9b01  ", "3f1c1b8e-0b5e-4a59-9d1c-2f7c8e1a9b01", true},
		{"3F1C1B8E-0B5E-4A59-9D1C-2F7C8E1A9B01", "", false}, // the kernel writes lower case
		{"3f1c1b8e0b5e4a599d1c2f7c8e1a9b01", "", false},
		{"3f1c1b8e-0b5e-4a59-9d1c-2f7c8e1a9b0\x00", "", false},
		{"", "", false},
		{strings.Repeat("a", 4096), "", false},
	} {
		got, err := parseBootID([]byte(tt.in))
		if (err == nil) != tt.ok || got != tt.want {
			t.Errorf("parseBootID(%.40q) = %q, %v; want %q, ok %v", tt.in, got, err, tt.want, tt.ok)
		}
	}
}

func TestParseUptime(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want float64
		ok   bool
	}{
		{"350735.47 234388.90\n", 350735.47, true},
		{"0.01 0.00", 0.01, true},
		{"-5 1", 0, false},
		{"NaN 1", 0, false},
		{"1e300 1", 0, false},
		{"", 0, false},
		{"x", 0, false},
	} {
		got, err := parseUptime([]byte(tt.in))
		if (err == nil) != tt.ok || got != tt.want {
			t.Errorf("parseUptime(%q) = %v, %v; want %v, ok %v", tt.in, got, err, tt.want, tt.ok)
		}
	}
}

func TestGuestAddresses(t *testing.T) {
	ifs := []qga.Interface{
		{Name: "lo", IPAddresses: []qga.IPAddress{{Address: "127.0.0.1", Prefix: 8}, {Address: "::1", Prefix: 128}}},
		{Name: "eth0", IPAddresses: []qga.IPAddress{
			{Address: "10.0.2.15", Prefix: 24}, {Address: "fe80::5054:ff:fe12:3456", Prefix: 64},
			{Address: "fd00::15", Prefix: 64}, {Address: "10.0.2.15", Prefix: 24}, // twice
			{Address: "not-an-ip", Prefix: 24}, {Address: "192.0.2.7", Prefix: 99}, {Address: "192.0.2.8", Prefix: -3},
		}},
	}
	got := strings.Join(guestAddresses(ifs), " ")
	if want := "10.0.2.15/24 192.0.2.7/32 192.0.2.8/0 fd00::15/64"; got != want {
		t.Fatalf("addresses %q, want %q", got, want)
	}
	var many []qga.IPAddress
	for i := range 300 {
		many = append(many, qga.IPAddress{Address: "10.1." + strconv.Itoa(i/250) + "." + strconv.Itoa(i%250+1), Prefix: 16})
	}
	if n := len(guestAddresses([]qga.Interface{{IPAddresses: many}})); n != maxGuestAddresses {
		t.Fatalf("%d addresses kept of 300, want %d", n, maxGuestAddresses)
	}
}

func TestClip(t *testing.T) {
	if got := clip("Debian\x1b[31m GNU/Linux\n12\x7f"); got != "Debian[31m GNU/Linux12" {
		t.Fatalf("clip kept control characters: %q", got)
	}
	// Cut inside a two-byte rune: the half is dropped.
	if got := clip("a" + strings.Repeat("é", 100)); len(got) > maxGuestString || !strings.HasPrefix(got, "aé") || !utf8.ValidString(got) {
		t.Fatalf("clip of a long name: %d bytes %q", len(got), got)
	}
}

// FuzzGuestText: what qemu-ga says of the guest is parsed without panics,
// and only well-formed values get through.
func FuzzGuestText(f *testing.F) {
	f.Add([]byte("3f1c1b8e-0b5e-4a59-9d1c-2f7c8e1a9b01\n"))
	f.Add([]byte("350735.47 234388.90\n"))
	f.Add([]byte("\xff\xfe"))
	f.Fuzz(func(t *testing.T, b []byte) {
		if id, err := parseBootID(b); err == nil && len(id) != 36 {
			t.Fatalf("accepted boot id %q", id)
		}
		if up, err := parseUptime(b); err == nil && !(up >= 0 && up <= 1e10) {
			t.Fatalf("accepted uptime %v", up)
		}
		if c := clip(string(b)); len(c) > maxGuestString || strings.ContainsFunc(c, func(r rune) bool { return r < 0x20 }) {
			t.Fatalf("clip gave %q", c)
		}
	})
}

// TestQGAWatcher runs the real qemu-guest-agent on this machine in place of
// a guest's: the watcher takes its answers as heartbeats, learns the boot
// id (this machine's), reports the guest up, runs commands through it, and
// sees it fall silent when the agent is stopped.
func TestQGAWatcher(t *testing.T) {
	a, rec := newBareAgent(t)
	a.qgaTimings = qgaTimings{every: 100 * time.Millisecond, answer: 500 * time.Millisecond, bootEvery: time.Second, infoEvery: time.Second}
	s := spec("web1", 64<<20)
	s.QGAPort = true
	v := a.newVM(s)
	a.vms["web1"] = v
	if err := os.MkdirAll(v.machine.Dir, 0o755); err != nil {
		t.Fatal(err)
	}
	agent := qgatest.Start(t, v.machine.QGASocket())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); v.watchQGA(ctx, newGuestGate(a.limitsForGuest())) }()
	t.Cleanup(func() { cancel(); <-done })

	guest := func() api.GuestInfo {
		v.mu.Lock()
		defer v.mu.Unlock()
		if v.guest == nil {
			return api.GuestInfo{}
		}
		return *v.guest
	}
	waitUntil(t, func() bool { return guest().Seq >= 3 })
	hostBoot, _ := os.ReadFile("/proc/sys/kernel/random/boot_id")
	g := guest()
	if g.Agent != agentQGA || g.BootID != strings.TrimSpace(string(hostBoot)) || g.UptimeSeconds <= 0 || g.OS == "" || g.Hostname == "" {
		t.Fatalf("guest info through qemu-ga: %+v", g)
	}
	if ready := rec.of(hostproto.EventGuestReady); len(ready) != 1 || bootOf(t, ready[0]) != g.BootID {
		t.Fatalf("guest-ready events: %+v", ready)
	}

	for _, tt := range []struct {
		req              api.ExecRequest
		output, errMatch string
		code             int
	}{
		{api.ExecRequest{Command: "echo out; echo err >&2; exit 3"}, "out\nerr\n", "", 3},
		{api.ExecRequest{Command: "sleep 30", TimeoutSeconds: 1}, "", "timed out", 124},
		{api.ExecRequest{Command: "sleep 30", Background: true}, "", "", 0},
	} {
		start := time.Now()
		res, err := a.Exec(context.Background(), hostproto.ExecRequest{VM: "web1", Exec: tt.req})
		if err != nil || res.Output != tt.output || res.ExitCode != tt.code || !strings.Contains(res.Error, tt.errMatch) {
			t.Errorf("exec %q: %+v, %v; want output %q, code %d, error with %q", tt.req.Command, res, err, tt.output, tt.code, tt.errMatch)
		}
		if took := time.Since(start); took > 10*time.Second {
			t.Errorf("exec %q took %v", tt.req.Command, took)
		}
	}

	// After a resume the guest's clock is set through the agent (this
	// test's agent refuses guest-set-time: it must not set this machine's
	// clock).
	v.setResync()
	waitUntil(t, func() bool { return rec.logged("could not set the guest's clock") == 1 })

	// A frozen agent: no more heartbeats; thawed, they come back, in the
	// same boot (no new guest-ready).
	if err := agent.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	frozenAt := guest().LastHeartbeat
	time.Sleep(1500 * time.Millisecond)
	if hb := guest().LastHeartbeat; hb.After(frozenAt) {
		t.Fatalf("heartbeats went on while the agent was stopped (%v after %v)", hb, frozenAt)
	}
	agent.Signal(syscall.SIGCONT)
	waitUntil(t, func() bool { return guest().LastHeartbeat.After(frozenAt) })
	if ready := rec.of(hostproto.EventGuestReady); len(ready) != 1 {
		t.Fatalf("%d guest-ready events after the agent came back in the same boot, want 1", len(ready))
	}
}
