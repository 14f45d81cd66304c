package qemu

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vigil-project/vigil/internal/guestimage"
	"github.com/vigil-project/vigil/internal/guestproto"
	"github.com/vigil-project/vigil/internal/pki"
	"github.com/vigil-project/vigil/internal/qemu/qmp"
	"github.com/vigil-project/vigil/internal/testenv"
)

// TestLiveMigrate boots a guest, live-migrates it over TCP to a second QEMU
// on the same disk file, and checks that the same boot carries on there:
// the agent's heartbeats and, once the source has exited and the forward is
// added, the guest's web server on the VM's host port.
func TestLiveMigrate(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a real guest; skipped with -short")
	}
	imageDir := os.Getenv("VIGIL_TEST_IMAGE")
	if imageDir == "" {
		t.Skip("VIGIL_TEST_IMAGE is not set (make test sets it)")
	}
	img, err := guestimage.Load(imageDir)
	if err != nil {
		t.Skipf("no guest image: %v", err)
	}
	bin, err := FindBinary()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()

	// Unix socket paths are limited to 108 bytes; t.TempDir can be longer.
	dir, err := os.MkdirTemp("", "vlm")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	disk := filepath.Join(dir, "disk.qcow2")
	if out, err := exec.CommandContext(ctx, "qemu-img", "create", "-q", "-f", "qcow2", disk, "256M").CombinedOutput(); err != nil {
		t.Fatalf("qemu-img: %v: %s", err, out)
	}
	port := freeTCPPort(t)
	accel, _ := ChooseAccel(AccelAuto)
	src := Machine{Name: "lm", UUID: "00000000-0000-4000-8000-000000000003", MemoryBytes: 128 << 20, RAMPad: true, CPUs: 1, Accel: accel,
		Kernel: img.Kernel, Initrd: img.Initrd, Cmdline: img.Cmdline + " vigil.name=lm",
		Disk: disk, HostPort: port, Dir: filepath.Join(dir, "src")}
	dst := src
	dst.Dir, dst.Incoming, dst.NoHostFwd = filepath.Join(dir, "dst"), true, true
	for _, d := range []string{src.Dir, dst.Dir} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}

	start := func(m Machine) *Process {
		t.Helper()
		p, err := Start(ctx, bin, m)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			kctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			p.Monitor.Close()
			p.Kill(kctx)
			if t.Failed() {
				serial, _ := os.ReadFile(m.SerialLog())
				log, _ := os.ReadFile(m.LogFile())
				t.Logf("%s serial log:\n%s\nqemu log:\n%s", m.Dir, serial, log)
			}
		})
		return p
	}

	srcP := start(src)
	booted := time.Now()
	first := heartbeats(ctx, t, src.AgentSocket(), 1)[0]
	t.Logf("source: first heartbeat %v after start, boot %s seq %d", time.Since(booted).Round(time.Millisecond), first.BootID, first.Seq)

	// The stream goes over TLS between two hosts of one cluster CA: the
	// destination admits only the source's certificate, the source checks
	// the destination's name.
	ca, _, err := pki.NewCA("lm")
	if err != nil {
		t.Fatal(err)
	}
	creds := func(name string) (string, *x509.Certificate) {
		t.Helper()
		d := filepath.Join(dir, "tls-"+name)
		cert, key, err := ca.Issue(pki.Profile{Role: pki.RoleHost, Name: name, IPs: []net.IP{net.IPv4(127, 0, 0, 1)}})
		if err != nil {
			t.Fatal(err)
		}
		os.Mkdir(d, 0o700)
		for f, b := range map[string][]byte{"ca-cert.pem": ca.CertPEM, "server-cert.pem": cert, "server-key.pem": key, "client-cert.pem": cert, "client-key.pem": key} {
			if err := os.WriteFile(filepath.Join(d, f), b, 0o600); err != nil {
				t.Fatal(err)
			}
		}
		c, _ := pki.ParseCert(cert)
		return d, c
	}
	srcTLS, srcCert := creds("h-src")
	dstTLS, _ := creds("h-dst")
	rogueTLS, _ := creds("h-rogue")

	if got, want := CertDN(srcCert), SubjectDN(pki.RoleHost, "h-src"); got != want {
		t.Fatalf("CertDN %q, SubjectDN %q", got, want)
	}
	dstP := start(dst)
	if _, err := MigrateIncoming(ctx, dstP.Monitor, "127.0.0.1", &MigrationTLS{Dir: dstTLS, Peer: CertDN(srcCert)}); err != nil {
		t.Fatal(err)
	}
	var mi liveMigrationInfo
	dstP.Monitor.Run(ctx, "query-migrate", nil, &mi)
	uri := "tcp:127.0.0.1:" + mi.SocketAddress[0].Port
	for _, bad := range []string{"exec:cat > /tmp/x", "unix:/tmp/s", "tcp:localhost:1", "tcp:127.0.0.1:0", "fd:3", "file:/tmp/x"} {
		if _, err := MigrateOut(ctx, srcP.Monitor, bad, nil, false); err == nil || !strings.Contains(err.Error(), "refused") {
			t.Fatalf("MigrateOut to %q: %v, want refused", bad, err)
		}
	}
	// A source that is another host (its certificate names h-rogue) is
	// refused by the destination; a destination that is not h-dst by the
	// source. Neither attempt may disturb the guest or the waiting QEMU.
	roguing := srcP
	if _, err := MigrateOut(ctx, roguing.Monitor, uri, &MigrationTLS{Dir: rogueTLS, Peer: "h-dst"}, false); err == nil {
		t.Fatal("a source with another host's certificate migrated")
	}
	if !strings.HasPrefix(uri, "tcp:127.0.0.1:") || strings.HasSuffix(uri, ":0") {
		t.Fatalf("incoming uri %q: want tcp:127.0.0.1:<bound port>", uri)
	}
	if !strings.HasPrefix(uri, "tcp:127.0.0.1:") || strings.HasSuffix(uri, ":0") {
		t.Fatalf("incoming uri %q: want tcp:127.0.0.1:<bound port>", uri)
	}

	// The guest's real pause runs from the source's STOP to the
	// destination's RESUME; QEMU's downtime figure ends when the source
	// has sent the last bytes, before the destination has loaded them.
	srcEvents, unsubscribe := srcP.Monitor.Subscribe()
	defer unsubscribe()
	dstEvents, unsubscribe := dstP.Monitor.Subscribe()
	defer unsubscribe()
	t0 := time.Now()
	stats, err := MigrateOut(ctx, srcP.Monitor, uri, &MigrationTLS{Dir: srcTLS, Peer: "h-dst"}, !LivePrecopySafe(src))
	if err != nil {
		t.Fatal(err)
	}
	wall := time.Since(t0)
	if err := WaitIncoming(ctx, dstP.Monitor); err != nil {
		t.Fatal(err)
	}
	paused := eventAt(t, dstEvents, "RESUME").Sub(eventAt(t, srcEvents, "STOP"))
	t.Logf("migrated to %s: wall %v, qemu total %v, downtime %v, setup %v, %d MiB sent; guest paused %v (source STOP to destination RESUME)",
		uri, wall.Round(time.Millisecond), stats.Total, stats.Downtime, stats.Setup, stats.Bytes>>20, paused.Round(time.Millisecond))
	if stats.Total <= 0 || stats.Bytes <= 0 {
		t.Errorf("implausible stats %+v", stats)
	}

	if st, err := srcP.Monitor.QueryStatus(ctx); err != nil || st.Status != "postmigrate" {
		t.Fatalf("source status %+v, %v; want postmigrate", st, err)
	}
	if st, err := dstP.Monitor.QueryStatus(ctx); err != nil || st.Status != "running" {
		t.Fatalf("destination status %+v, %v; want running", st, err)
	}

	// Two heartbeats on the destination: the first may have been written
	// by the guest before the switchover and held in the virtio-serial
	// queue; the second is proof the guest runs here.
	after := heartbeats(ctx, t, dst.AgentSocket(), 2)
	for _, hb := range after {
		if hb.BootID != first.BootID || hb.Seq <= first.Seq {
			t.Fatalf("destination heartbeat boot %s seq %d; want boot %s, seq above %d", hb.BootID, hb.Seq, first.BootID, first.Seq)
		}
	}
	if after[1].Seq <= after[0].Seq {
		t.Fatalf("destination heartbeat seqs %d, %d do not increase", after[0].Seq, after[1].Seq)
	}

	// The source holds the host port until it exits.
	if err := AddHostFwd(ctx, dstP.Monitor, port); err == nil {
		t.Fatal("AddHostFwd succeeded while the source still holds the port")
	}
	if err := srcP.Monitor.Quit(ctx); err != nil {
		t.Fatal(err)
	}
	if err := WaitGone(ctx, srcP.PID); err != nil {
		t.Fatal(err)
	}
	if err := AddHostFwd(ctx, dstP.Monitor, port); err != nil {
		t.Fatal(err)
	}
	url := fmt.Sprintf("http://127.0.0.1:%d/", port)
	if body := testenv.HTTPGet(ctx, t, url); !strings.Contains(body, first.BootID) {
		t.Fatalf("GET %s after migration: body lacks boot id %s: %q", url, first.BootID, body)
	}
	if err := RemoveHostFwd(ctx, dstP.Monitor, port); err != nil {
		t.Fatal(err)
	}
	if err := RemoveHostFwd(ctx, dstP.Monitor, port); err == nil || !strings.Contains(err.Error(), "not found") {
		t.Fatalf("removing a removed forward: err = %v, want not found", err)
	}
}

// eventAt returns QEMU's timestamp of the first event called name.
func eventAt(t *testing.T, events <-chan qmp.Event, name string) time.Time {
	t.Helper()
	timeout := time.After(5 * time.Second)
	for {
		select {
		case ev, ok := <-events:
			if !ok {
				t.Fatalf("monitor closed before %s", name)
			}
			if ev.Name == name {
				return ev.Time
			}
		case <-timeout:
			t.Fatalf("no %s event", name)
		}
	}
}

// heartbeats connects to a guest agent socket and returns the next n
// heartbeats.
func heartbeats(ctx context.Context, t *testing.T, sock string, n int) []guestproto.Heartbeat {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	var conn net.Conn
	for {
		var err error
		var d net.Dialer
		if conn, err = d.DialContext(ctx, "unix", sock); err == nil {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("dial %s: %v", sock, err)
		case <-time.After(20 * time.Millisecond):
		}
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	var hbs []guestproto.Heartbeat
	dec := guestproto.NewDecoder(conn)
	for len(hbs) < n {
		m, err := dec.Decode()
		if errors.Is(err, guestproto.ErrMalformed) || errors.Is(err, guestproto.ErrVersion) {
			continue // early-boot noise on the channel
		}
		if err != nil {
			t.Fatalf("read heartbeats from %s (have %d of %d): %v", sock, len(hbs), n, errors.Join(err, ctx.Err()))
		}
		if m.Type == guestproto.TypeHeartbeat {
			hbs = append(hbs, *m.Heartbeat)
		}
	}
	return hbs
}

func freeTCPPort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// TestPrecopyUnderTCG migrates a guest that keeps writing to its memory
// (dd from /dev/urandom into tmpfs, in a loop) three times, the way the
// host agent does (MigrateOut, live when LivePrecopySafe), and checks it
// runs on after each: heartbeats, no panic. With live precopy under TCG
// (QEMU 7.2) this guest crashed after the first or second migration when
// its RAM was a whole number of MiB; with RAMPad it is copied live, and
// must survive every move (see LivePrecopySafe).
func TestPrecopyUnderTCG(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a real guest; skipped with -short")
	}
	img, err := guestimage.Load(os.Getenv("VIGIL_TEST_IMAGE"))
	if err != nil {
		t.Skipf("no guest image (make test sets VIGIL_TEST_IMAGE): %v", err)
	}
	bin, err := FindBinary()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	dir, err := os.MkdirTemp("", "vpc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	disk := filepath.Join(dir, "disk.qcow2")
	if out, err := exec.CommandContext(ctx, "qemu-img", "create", "-q", "-f", "qcow2", disk, "256M").CombinedOutput(); err != nil {
		t.Fatalf("qemu-img: %v: %s", err, out)
	}
	accel, _ := ChooseAccel(AccelAuto)
	machine := func(i int) Machine {
		m := Machine{Name: "pc", UUID: "00000000-0000-4000-8000-000000000004", MemoryBytes: 256 << 20, RAMPad: true, CPUs: 1, Accel: accel,
			Kernel: img.Kernel, Initrd: img.Initrd, Cmdline: img.Cmdline + " vigil.name=pc",
			Disk: disk, HostPort: freeTCPPort(t), Dir: filepath.Join(dir, fmt.Sprint(i)), NoHostFwd: true, Incoming: i > 0}
		if err := os.Mkdir(m.Dir, 0o755); err != nil {
			t.Fatal(err)
		}
		return m
	}
	start := func(m Machine) *Process {
		t.Helper()
		p, err := Start(ctx, bin, m)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			kctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			p.Monitor.Close()
			p.Kill(kctx)
		})
		return p
	}
	cur := machine(0)
	p := start(cur)
	heartbeats(ctx, t, cur.AgentSocket(), 1)
	conn, err := net.Dial("unix", cur.AgentSocket())
	if err != nil {
		t.Fatal(err)
	}
	guestproto.NewEncoder(conn).Encode(guestproto.Message{Type: guestproto.TypeExec, ID: "busy", Exec: &guestproto.Exec{Background: true,
		Command: "while true; do dd if=/dev/urandom of=/tmp/x bs=64k count=200 2>/dev/null; sleep 0.05; done"}})
	time.Sleep(time.Second)
	conn.Close()
	for round := 1; round <= 3; round++ {
		next := machine(round)
		np := start(next)
		uri, err := MigrateIncoming(ctx, np.Monitor, "127.0.0.1", nil)
		if err != nil {
			t.Fatal(err)
		}
		st, err := MigrateOut(ctx, p.Monitor, uri, nil, !LivePrecopySafe(cur))
		if err != nil {
			t.Fatal(err)
		}
		if err := WaitIncoming(ctx, np.Monitor); err != nil {
			t.Fatal(err)
		}
		p.Monitor.Quit(ctx)
		WaitGone(ctx, p.PID)
		p, cur = np, next
		// Heartbeats for a while: a corrupted guest dies within seconds.
		hbs := heartbeats(ctx, t, cur.AgentSocket(), 5)
		if status, _ := p.Monitor.QueryStatus(ctx); status.Status != "running" {
			serial, _ := os.ReadFile(cur.SerialLog())
			t.Fatalf("after migration %d the guest is %s:\n%s", round, status.Status, serial)
		}
		t.Logf("migration %d: %v total, guest stopped %v, %d MiB; heartbeats go on (seq %d)", round, st.Total, st.Downtime, st.Bytes>>20, hbs[4].Seq)
	}
}
