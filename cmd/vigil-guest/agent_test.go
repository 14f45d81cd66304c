package main

import (
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"testing/fstest"
	"time"

	"github.com/vigil-project/vigil/internal/guestproto"
)

var fakeNow = time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)

func fakeProc() fstest.MapFS {
	return fstest.MapFS{
		"sys/kernel/random/boot_id": {Data: []byte("1b2c3d4e-0000-4000-8000-000000000001\n")},
		"uptime":                    {Data: []byte("12.34 10.00\n")},
		"loadavg":                   {Data: []byte("0.50 0.20 0.10 1/50 123\n")},
		"meminfo":                   {Data: []byte("MemTotal:         100 kB\nMemFree:  10 kB\nMemAvailable:      40 kB\n")},
	}
}

func testAgent(proc fs.FS, interval time.Duration) *agent {
	return &agent{
		proc:     proc,
		interval: interval,
		now:      func() time.Time { return fakeNow },
		log:      slog.New(slog.NewTextHandler(io.Discard, nil)),
	}
}

// host is the test's view of the other end of the port.
type host struct {
	toGuest *io.PipeWriter
	dec     *guestproto.Decoder
	enc     *guestproto.Encoder
}

// startAgent runs the agent over pipes. guestWriter wraps the guest's
// outgoing stream so tests can interfere with writes.
func startAgent(t *testing.T, a *agent, wrap func(io.Writer) io.Writer) (*host, <-chan error) {
	t.Helper()
	hr, gw := io.Pipe() // guest -> host
	gr, hw := io.Pipe() // host -> guest
	var w io.Writer = gw
	if wrap != nil {
		w = wrap(gw)
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- a.run(ctx, readWriter{gr, w}) }()
	t.Cleanup(func() {
		cancel()
		hr.Close()
		gw.Close()
		hw.Close()
		gr.Close()
	})
	return &host{toGuest: hw, dec: guestproto.NewDecoder(hr), enc: guestproto.NewEncoder(hw)}, errc
}

func TestHeartbeatContents(t *testing.T) {
	h, _ := startAgent(t, testAgent(fakeProc(), time.Millisecond), nil)
	for want := uint64(1); want <= 3; want++ {
		m, err := h.dec.Decode()
		if err != nil {
			t.Fatal(err)
		}
		if m.Type != guestproto.TypeHeartbeat || m.Heartbeat == nil {
			t.Fatalf("got %+v", m)
		}
		hb := *m.Heartbeat
		if hb.Seq != want {
			t.Fatalf("seq %d, want %d", hb.Seq, want)
		}
		wantHB := guestproto.Heartbeat{
			BootID: "1b2c3d4e-0000-4000-8000-000000000001", Seq: want,
			UptimeSeconds: 12.34, Load1: 0.5,
			MemUsedBytes: 60 * 1024, MemTotalBytes: 100 * 1024,
		}
		if !hb.SentAt.Equal(fakeNow) {
			t.Fatalf("sent_at %v", hb.SentAt)
		}
		hb.SentAt = time.Time{}
		if hb != wantHB {
			t.Fatalf("heartbeat %+v, want %+v", hb, wantHB)
		}
	}
}

func TestHeartbeatWithBrokenProc(t *testing.T) {
	proc := fakeProc()
	delete(proc, "meminfo")
	proc["loadavg"] = &fstest.MapFile{Data: []byte("nope\n")}
	hb, err := testAgent(proc, time.Second).heartbeat(1)
	if err == nil {
		t.Fatal("want error for broken /proc")
	}
	// Whatever could be read is still reported.
	if hb.BootID == "" || hb.UptimeSeconds != 12.34 || hb.Seq != 1 {
		t.Fatalf("partial heartbeat lost data: %+v", hb)
	}
}

func TestPingPong(t *testing.T) {
	h, _ := startAgent(t, testAgent(fakeProc(), time.Hour), nil)
	if err := h.enc.Encode(guestproto.Message{Type: guestproto.TypePing, ID: "p-1"}); err != nil {
		t.Fatal(err)
	}
	got := map[string]bool{}
	for len(got) < 2 {
		m, err := h.dec.Decode()
		if err != nil {
			t.Fatal(err)
		}
		switch m.Type {
		case guestproto.TypeHeartbeat:
			got["heartbeat"] = true
		case guestproto.TypePong:
			if m.ID != "p-1" {
				t.Fatalf("pong id %q", m.ID)
			}
			got["pong"] = true
		}
	}
}

func TestNoiseIsIgnored(t *testing.T) {
	h, _ := startAgent(t, testAgent(fakeProc(), time.Hour), nil)
	go func() {
		io.WriteString(h.toGuest, "boot noise\x00\n{\"v\":9,\"type\":\"ping\",\"id\":\"future\"}\n")
		h.enc.Encode(guestproto.Message{Type: guestproto.TypePing, ID: "after-noise"})
	}()
	for {
		m, err := h.dec.Decode()
		if err != nil {
			t.Fatal(err)
		}
		if m.Type == guestproto.TypePong {
			if m.ID != "after-noise" {
				t.Fatalf("pong id %q", m.ID)
			}
			return
		}
	}
}

// blockingHeartbeats blocks every heartbeat write until release is closed,
// mimicking a virtio port whose host side is gone, while letting other
// writes through.
type blockingHeartbeats struct {
	w       io.Writer
	release chan struct{}
	blocked chan struct{}
	once    sync.Once
}

func (b *blockingHeartbeats) Write(p []byte) (int, error) {
	if bytes.Contains(p, []byte(`"heartbeat"`)) {
		b.once.Do(func() { close(b.blocked) })
		<-b.release
	}
	return b.w.Write(p)
}

// While a heartbeat write is stuck (host side not connected), the reader must
// keep consuming input, and the ping must be answered once writes flow again.
func TestReaderRunsWhileHeartbeatBlocked(t *testing.T) {
	bw := &blockingHeartbeats{release: make(chan struct{}), blocked: make(chan struct{})}
	h, _ := startAgent(t, testAgent(fakeProc(), time.Hour), func(w io.Writer) io.Writer {
		bw.w = w
		return bw
	})
	<-bw.blocked
	sent := make(chan error, 1)
	// io.Pipe's Write only returns once the guest has read the bytes.
	go func() { sent <- h.enc.Encode(guestproto.Message{Type: guestproto.TypePing, ID: "x"}) }()
	select {
	case err := <-sent:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("guest stopped reading while a heartbeat write was blocked")
	}
	close(bw.release)
	for {
		m, err := h.dec.Decode()
		if err != nil {
			t.Fatal(err)
		}
		if m.Type == guestproto.TypePong {
			if m.ID != "x" {
				t.Fatalf("pong id %q", m.ID)
			}
			return
		}
	}
}

func TestRunEndsOnEOF(t *testing.T) {
	h, errc := startAgent(t, testAgent(fakeProc(), time.Hour), nil)
	if _, err := h.dec.Decode(); err != nil { // drain the first heartbeat
		t.Fatal(err)
	}
	h.toGuest.Close()
	select {
	case err := <-errc:
		if !errors.Is(err, io.EOF) {
			t.Fatalf("got %v, want EOF", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("run did not return")
	}
}

func TestCmdlineInterval(t *testing.T) {
	tests := []struct {
		cmdline string
		want    time.Duration
		ok      bool
		err     bool
	}{
		{"console=ttyS0 loglevel=4", 0, false, false},
		{"console=ttyS0 vigil.heartbeat=500ms vigil.name=t1\n", 500 * time.Millisecond, true, false},
		{"vigil.heartbeat=2s", 2 * time.Second, true, false},
		{"vigil.heartbeat=soon", 0, false, true},
		{"vigil.heartbeat=-1s", 0, false, true},
		{"xvigil.heartbeat=1s", 0, false, false},
	}
	for _, tc := range tests {
		d, ok, err := cmdlineInterval(tc.cmdline)
		if d != tc.want || ok != tc.ok || (err != nil) != tc.err {
			t.Errorf("%q: got (%v, %v, %v), want (%v, %v, err=%v)", tc.cmdline, d, ok, err, tc.want, tc.ok, tc.err)
		}
	}
}

func TestFindPort(t *testing.T) {
	sys := t.TempDir()
	mk := func(port, name string) {
		d := filepath.Join(sys, "class", "virtio-ports", port)
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(d, "name"), []byte(name+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := findPort(sys, "/dev", guestproto.PortName); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("empty sysfs: got %v", err)
	}
	mk("vport0p1", "org.qemu.guest_agent.0")
	mk("vport1p2", guestproto.PortName)
	got, err := findPort(sys, "/dev", guestproto.PortName)
	if err != nil || got != "/dev/vport1p2" {
		t.Fatalf("got (%q, %v)", got, err)
	}
}

func TestWaitPortRetries(t *testing.T) {
	sys, dev := t.TempDir(), t.TempDir()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	go func() {
		time.Sleep(50 * time.Millisecond)
		d := filepath.Join(sys, "class", "virtio-ports", "vport3p1")
		os.MkdirAll(d, 0o755)
		os.WriteFile(filepath.Join(d, "name"), []byte(guestproto.PortName), 0o644)
		time.Sleep(50 * time.Millisecond)
		// The device node appears after the sysfs entry.
		os.WriteFile(filepath.Join(dev, "vport3p1"), nil, 0o600)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	f, err := waitPort(ctx, sys, dev, 10*time.Millisecond, log)
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	if filepath.Base(f.Name()) != "vport3p1" {
		t.Fatalf("opened %s", f.Name())
	}
}

// eofThenData returns EOF a few times (host not connected) before data.
type eofThenData struct {
	eofs int
	r    io.Reader
}

func (e *eofThenData) Read(p []byte) (int, error) {
	if e.eofs > 0 {
		e.eofs--
		return 0, io.EOF
	}
	return e.r.Read(p)
}

func TestEOFRetryReader(t *testing.T) {
	r := &eofRetryReader{ctx: context.Background(), r: &eofThenData{eofs: 3, r: strings.NewReader("hi")}, every: time.Millisecond}
	b := make([]byte, 8)
	n, err := r.Read(b)
	if err != nil || string(b[:n]) != "hi" {
		t.Fatalf("got (%q, %v)", b[:n], err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	r = &eofRetryReader{ctx: ctx, r: strings.NewReader(""), every: time.Millisecond}
	if _, err := r.Read(b); !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v, want context.Canceled", err)
	}
}

// A heartbeat asked for comes at once, not an interval later (a resumed
// guest shows healthy at once); asking many times makes no flood.
func TestHeartbeatNow(t *testing.T) {
	h, _ := startAgent(t, testAgent(fakeProc(), time.Hour), nil)
	first, err := h.dec.Decode() // the one at start
	if err != nil || first.Type != guestproto.TypeHeartbeat {
		t.Fatalf("first message: %+v %v", first, err)
	}
	for i := 0; i < 5; i++ {
		if err := h.enc.Encode(guestproto.Message{Type: guestproto.TypeHeartbeatNow}); err != nil {
			t.Fatal(err)
		}
	}
	got := make(chan guestproto.Message, 10)
	go func() {
		for {
			m, err := h.dec.Decode()
			if err != nil {
				return
			}
			got <- m
		}
	}()
	select {
	case m := <-got:
		if m.Type != guestproto.TypeHeartbeat || m.Heartbeat.Seq != 2 {
			t.Fatalf("answer: %+v", m)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no heartbeat when asked (the interval is an hour)")
	}
	// The pipe is synchronous and the test reads nothing while it asks, so
	// the heartbeat loop is stuck writing heartbeat 2 (for ask 1) while
	// ask 2 waits and asks 3 and 4 find one already waiting. Ask 5 may
	// be handled after the loop took ask 2, and then earns a heartbeat of
	// its own: it may have come after heartbeat 3 was gathered. So 5 asks
	// give 2 or 3 heartbeats, never 5.
	time.Sleep(200 * time.Millisecond)
	if n := len(got); n > 2 {
		t.Fatalf("%d more heartbeats for 5 asks at once: at most two more", n)
	}
}
