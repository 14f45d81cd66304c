package bootsvc

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv4"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/bootconfig"
	"github.com/vigil-project/vigil/internal/boothost"
	"github.com/vigil-project/vigil/internal/hostimage"
	"github.com/vigil-project/vigil/internal/pki"
	"github.com/vigil-project/vigil/internal/store"
)

func testRegistry(t *testing.T) *Registry {
	t.Helper()
	e, err := store.StartEmbedded(context.Background(), t.TempDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	return &Registry{Store: store.New(e.Client(), "/test/"), ImagesDir: t.TempDir()}
}

// fakeImage puts a host image (small stand-in files) in reg's directory.
func fakeImage(t *testing.T, reg *Registry, content string) string {
	t.Helper()
	stage := t.TempDir()
	os.WriteFile(filepath.Join(stage, "vmlinuz"), []byte("kernel "+content), 0o644)
	os.WriteFile(filepath.Join(stage, "initrd.img"), []byte("initrd "+content), 0o644)
	// The digest as hostimage computes it: each file's length, then bytes.
	h := newDigest()
	for _, f := range []string{"vmlinuz", "initrd.img"} {
		b, _ := os.ReadFile(filepath.Join(stage, f))
		fmt.Fprintf(h, "%d\n", len(b))
		h.Write(b)
	}
	digest := "sha256:" + fmt.Sprintf("%x", h.Sum(nil))
	m, _ := json.Marshal(hostimage.Image{Digest: digest, Kernel: "vmlinuz", Initrd: "initrd.img", KernelVersion: "6.1.0-test", BuiltAt: time.Now()})
	os.WriteFile(filepath.Join(stage, "manifest.json"), m, 0o644)
	dst := hostimage.Path(reg.ImagesDir, digest)
	if err := os.Rename(stage, dst); err != nil {
		t.Fatal(err)
	}
	img, err := hostimage.Load(dst)
	if err != nil {
		t.Fatal(err)
	}
	if err := img.Verify(); err != nil {
		t.Fatal(err)
	}
	return digest
}

func TestAdmitAndProfiles(t *testing.T) {
	reg := testRegistry(t)
	ctx := context.Background()
	if _, err := reg.SetProfile(ctx, api.BootProfile{Name: "default", Image: "sha256:" + strings.Repeat("0", 64)}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("profile with an image not here: %v", err)
	}
	digest := fakeImage(t, reg, "a")
	if _, err := reg.SetProfile(ctx, api.BootProfile{Name: "Bad Name", Image: digest}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("bad profile name: %v", err)
	}
	if _, err := reg.SetProfile(ctx, api.BootProfile{Name: "default", Image: digest}); err != nil {
		t.Fatal(err)
	}
	if _, err := reg.Admit(ctx, "52:54:00:00:00:01", api.BootAdmitRequest{Profile: "nosuch", HostName: "h1"}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("admit with an unknown profile: %v", err)
	}
	if _, err := reg.Admit(ctx, "not-a-mac", api.BootAdmitRequest{Profile: "default", HostName: "h1"}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("admit a bad address: %v", err)
	}
	m, err := reg.Admit(ctx, "52:54:00:00:00:01", api.BootAdmitRequest{Profile: "default", HostName: "h1"})
	if err != nil || m.State != api.MachineAdmitted {
		t.Fatalf("admit: %+v %v", m, err)
	}
	if _, err := reg.Admit(ctx, "52:54:00:00:00:02", api.BootAdmitRequest{Profile: "default", HostName: "h1"}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("a second machine under the same host name: %v", err)
	}
	if m, err := reg.Quarantine(ctx, "52:54:00:00:00:01"); err != nil || m.State != api.MachineQuarantined {
		t.Fatalf("quarantine: %+v %v", m, err)
	}
}

func TestLeasesAreStableAndNeverShared(t *testing.T) {
	reg := testRegistry(t)
	ctx := context.Background()
	first, last := netip.MustParseAddr("10.77.0.10"), netip.MustParseAddr("10.77.0.19")
	// Two boot services on one registry, ten machines at once.
	other := &Registry{Store: reg.Store, ImagesDir: reg.ImagesDir}
	var mu sync.Mutex
	got := map[netip.Addr]string{}
	var wg sync.WaitGroup
	for i := 0; i < 10; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := reg
			if i%2 == 1 {
				r = other
			}
			mac := fmt.Sprintf("52:54:00:00:01:%02x", i)
			ip, err := r.leaseFor(ctx, mac, first, last, noSkip)
			if err != nil {
				t.Error(err)
				return
			}
			mu.Lock()
			defer mu.Unlock()
			if prev, ok := got[ip]; ok {
				t.Errorf("%s given to %s and %s", ip, prev, mac)
			}
			got[ip] = mac
		}()
	}
	wg.Wait()
	for ip, mac := range got {
		again, err := other.leaseFor(ctx, mac, first, last, noSkip)
		if err != nil || again != ip {
			t.Errorf("%s asked again: %s %v, want %s", mac, again, err, ip)
		}
	}
	if _, err := reg.leaseFor(ctx, "52:54:00:00:02:00", first, last, noSkip); err == nil || !strings.Contains(err.Error(), "full") {
		t.Fatalf("an eleventh machine in ten addresses: %v", err)
	}
}

func dhcpRequest(t *testing.T, typ dhcpv4.MessageType, mods ...dhcpv4.Modifier) *dhcpv4.DHCPv4 {
	t.Helper()
	mac, _ := net.ParseMAC("52:54:00:be:ee:01")
	req, err := dhcpv4.New(append([]dhcpv4.Modifier{dhcpv4.WithHwAddr(mac), dhcpv4.WithMessageType(typ)}, mods...)...)
	if err != nil {
		t.Fatal(err)
	}
	return req
}

func TestDHCPAnswers(t *testing.T) {
	cfg := dhcpConfig{ServerIP: netip.MustParseAddr("10.77.0.1"), Prefix: netip.MustParsePrefix("10.77.0.1/24")}
	ip := netip.MustParseAddr("10.77.0.128")
	ipxe := dhcpv4.WithUserClass("iPXE", false)
	host := dhcpv4.WithOption(dhcpv4.OptClassIdentifier(hostVendorClass))
	if k := clientKind(dhcpRequest(t, dhcpv4.MessageTypeDiscover, ipxe)); k != "ipxe" {
		t.Errorf("iPXE client: %q", k)
	}
	if k := clientKind(dhcpRequest(t, dhcpv4.MessageTypeDiscover, host)); k != "host" {
		t.Errorf("booted host: %q", k)
	}
	if k := clientKind(dhcpRequest(t, dhcpv4.MessageTypeDiscover, dhcpv4.WithOption(dhcpv4.OptClassIdentifier("PXEClient:Arch:00000")))); k != "pxe" {
		t.Errorf("plain PXE: %q", k)
	}
	if k := clientKind(dhcpRequest(t, dhcpv4.MessageTypeDiscover)); k != "" {
		t.Errorf("some other machine: %q", k)
	}

	offer := answer(dhcpRequest(t, dhcpv4.MessageTypeDiscover, ipxe), cfg, ip, "http://10.77.0.1:8067/boot.ipxe?mac=52:54:00:be:ee:01")
	if offer == nil || offer.MessageType() != dhcpv4.MessageTypeOffer || !offer.YourIPAddr.Equal(ip.AsSlice()) ||
		offer.BootFileNameOption() != "http://10.77.0.1:8067/boot.ipxe?mac=52:54:00:be:ee:01" || offer.SubnetMask().String() != "ffffff00" {
		t.Fatalf("offer: %v", offer)
	}
	if got := offer.Options.Get(optIPXEEncap); !bytes.Equal(got, []byte{176, 1, 1}) {
		t.Errorf("offer to iPXE lacks no-pxedhcp (iPXE would wait ~3 s for ProxyDHCP): option 175 = %v", got)
	}
	ack := answer(dhcpRequest(t, dhcpv4.MessageTypeRequest, host, dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(ip.AsSlice()))), cfg, ip, "")
	if ack == nil || ack.MessageType() != dhcpv4.MessageTypeAck || ack.BootFileNameOption() != "" {
		t.Fatalf("ack: %v", ack)
	}
	if ack.Options.Has(optIPXEEncap) {
		t.Errorf("iPXE options sent to a booted host")
	}
	nak := answer(dhcpRequest(t, dhcpv4.MessageTypeRequest, host, dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(net.ParseIP("10.77.0.99")))), cfg, ip, "")
	if nak == nil || nak.MessageType() != dhcpv4.MessageTypeNak {
		t.Fatalf("request for another address: %v", nak)
	}
	if r := answer(dhcpRequest(t, dhcpv4.MessageTypeRequest, host, dhcpv4.WithOption(dhcpv4.OptServerIdentifier(net.ParseIP("10.77.0.2")))), cfg, ip, ""); r != nil {
		t.Fatalf("a request to another server was answered: %v", r)
	}
	if r := answer(dhcpRequest(t, dhcpv4.MessageTypeRelease, host), cfg, ip, ""); r != nil {
		t.Fatalf("a release was answered: %v", r)
	}
}

func FuzzDHCP(f *testing.F) {
	mac, _ := net.ParseMAC("52:54:00:be:ee:01")
	req, _ := dhcpv4.NewDiscovery(mac, dhcpv4.WithUserClass("iPXE", false))
	f.Add(req.ToBytes())
	f.Add([]byte{1, 1, 6, 0})
	cfg := dhcpConfig{ServerIP: netip.MustParseAddr("10.77.0.1"), Prefix: netip.MustParsePrefix("10.77.0.1/24")}
	f.Fuzz(func(t *testing.T, b []byte) {
		req, err := dhcpv4.FromBytes(b)
		if err != nil {
			return
		}
		if clientKind(req) != "" {
			answer(req, cfg, netip.MustParseAddr("10.77.0.128"), "http://x/boot.ipxe")
			proxyAnswer(req, cfg, "http://x/boot.ipxe", false)
			proxyAnswer(req, cfg, "http://x/boot.ipxe", true)
		}
	})
}

func TestProxyDHCPAnswers(t *testing.T) {
	cfg := dhcpConfig{ServerIP: netip.MustParseAddr("10.77.0.1"), Prefix: netip.MustParsePrefix("10.77.0.1/24")}
	const url = "http://10.77.0.1:8067/boot.ipxe?mac=52:54:00:be:ee:01"
	ipxe := dhcpv4.WithUserClass("iPXE", false)
	cases := []struct {
		name     string
		typ      dhcpv4.MessageType
		port4011 bool
		bootfile string
		want     dhcpv4.MessageType // none: no answer
	}{
		{"discover", dhcpv4.MessageTypeDiscover, false, url, dhcpv4.MessageTypeOffer},
		{"request for an address (the network's server answers)", dhcpv4.MessageTypeRequest, false, url, dhcpv4.MessageTypeNone},
		{"proxydhcp request on 4011", dhcpv4.MessageTypeRequest, true, url, dhcpv4.MessageTypeAck},
		{"discover on 4011", dhcpv4.MessageTypeDiscover, true, url, dhcpv4.MessageTypeNone},
		{"release", dhcpv4.MessageTypeRelease, false, url, dhcpv4.MessageTypeNone},
		{"nothing to boot", dhcpv4.MessageTypeDiscover, false, "", dhcpv4.MessageTypeNone},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := proxyAnswer(dhcpRequest(t, c.typ, ipxe), cfg, c.bootfile, c.port4011)
			if c.want == dhcpv4.MessageTypeNone {
				if r != nil {
					t.Fatalf("answered: %v", r)
				}
				return
			}
			// No address (the network's server gives it); PXEClient marks
			// it as ProxyDHCP; the boot file is the script's URL.
			if r == nil || r.MessageType() != c.want || !r.YourIPAddr.IsUnspecified() || r.ClassIdentifier() != "PXEClient" ||
				r.BootFileNameOption() != url || !r.ServerIdentifier().Equal(net.ParseIP("10.77.0.1")) {
				t.Fatalf("answer: %v", r)
			}
		})
	}
}

type fakeCluster struct {
	mu      sync.Mutex
	issued  []string // token ids
	revoked []string
}

func (c *fakeCluster) JoinToken(_ context.Context, host string) (api.JoinToken, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := pki.NewJoinToken(strings.Repeat("ab", 32))
	c.issued = append(c.issued, t.ID)
	return api.JoinToken{Token: t.String(), Host: host}, nil
}

func (c *fakeCluster) RevokeJoinToken(_ context.Context, id string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.revoked = append(c.revoked, id)
	return nil
}

// clock is a settable time for a registry.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time      { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration) { c.mu.Lock(); c.t = c.t.Add(d); c.mu.Unlock() }

// testServer is a boot service's handlers without its listeners.
func testServer(t *testing.T) (*Server, *pki.CA, string) {
	t.Helper()
	reg := testRegistry(t)
	ca, _, err := pki.NewCA("test")
	if err != nil {
		t.Fatal(err)
	}
	digest := fakeImage(t, reg, "one")
	if _, err := reg.SetProfile(context.Background(), api.BootProfile{Name: "default", Image: digest}); err != nil {
		t.Fatal(err)
	}
	return &Server{reg: reg, ca: ca, cluster: &fakeCluster{}, log: slog.New(slog.DiscardHandler),
		managerURLs: []string{"https://10.77.0.1:7070"}, tlsAddr: "10.77.0.1:8068"}, ca, digest
}

func post(t *testing.T, h http.Handler, path string, body any) *httptest.ResponseRecorder {
	t.Helper()
	b, _ := json.Marshal(body)
	w := httptest.NewRecorder()
	h.ServeHTTP(w, httptest.NewRequest("POST", path, bytes.NewReader(b)))
	return w
}

func TestBootFlow(t *testing.T) {
	s, ca, digest := testServer(t)
	clk := &clock{t: time.Now()}
	s.reg.Now = clk.now
	ctx := context.Background()
	boot, tlsH := s.bootHandler(), s.tlsHandler()
	const nonce1, nonce2 = "0123456789abcdef01", "fedcba9876543210fe"
	const mac = "52:54:00:be:ee:01"

	// An unknown machine boots the default image and is listed, quarantined.
	// First iPXE is asked what the machine is (SMBIOS), then the script
	// proper is made for it; the first ask records nothing.
	w := httptest.NewRecorder()
	boot.ServeHTTP(w, httptest.NewRequest("GET", "http://10.77.0.1:8067/boot.ipxe?mac=52:54:00:BE:EE:01", nil))
	if want := "#!ipxe\nchain http://10.77.0.1:8067/boot.ipxe?mac=" + mac + "&smbios=1&uuid=${uuid}&vendor=${manufacturer:uristring}&product=${product:uristring}\n"; w.Body.String() != want {
		t.Fatalf("first script:\n%s\nwant\n%s", w.Body.String(), want)
	}
	if _, err := s.reg.Machine(ctx, mac); !errors.Is(err, ErrNotFound) {
		t.Fatalf("the first ask recorded the machine: %v", err)
	}
	w = httptest.NewRecorder()
	boot.ServeHTTP(w, httptest.NewRequest("GET", "http://10.77.0.1:8067/boot.ipxe?mac="+mac+"&smbios=1&uuid=&vendor=QEMU&product=Standard%20PC%20%28Q35%20%2B%20ICH9%2C%202009%29", nil))
	script := w.Body.String()
	hex := strings.TrimPrefix(digest, "sha256:")
	for _, want := range []string{"#!ipxe", "kernel http://10.77.0.1:8067/images/" + hex + "/vmlinuz", "vigil.boot=https://10.77.0.1:8068",
		"vigil.bootmac=" + mac, "vigil.image=" + digest, "vigil.kernel=http://10.77.0.1:8067/images/" + hex + "/vmlinuz", "initrd http://10.77.0.1:8067/images/" + hex + "/initrd.img", "boot"} {
		if !strings.Contains(script, want) {
			t.Errorf("script lacks %q:\n%s", want, script)
		}
	}
	if m, err := s.reg.Machine(ctx, mac); err != nil || m.State != api.MachineQuarantined || m.Vendor != "QEMU" || m.Product != "Standard PC (Q35 + ICH9, 2009)" {
		t.Fatalf("after its first boot: %+v %v", m, err)
	}
	// Image files: only what is there, by digest.
	for path, code := range map[string]int{
		"/images/" + hex + "/vmlinuz":                     200,
		"/images/" + hex + "/initrd.img?mac=" + mac:       200,
		"/images/" + hex + "/manifest.json":               404,
		"/images/" + strings.Repeat("0", 64) + "/vmlinuz": 404,
		"/images/../../etc/vmlinuz":                       404,
	} {
		w := httptest.NewRecorder()
		boot.ServeHTTP(w, httptest.NewRequest("GET", path, nil))
		if w.Code != code && !(code == 404 && w.Code >= 300 && w.Code < 500) {
			t.Errorf("GET %s: %d, want %d", path, w.Code, code)
		}
	}

	// Quarantined: no configuration, no credentials.
	if w := post(t, tlsH, boothost.ConfigPath, boothost.Request{MAC: mac, Nonce: nonce1}); w.Code != http.StatusForbidden || strings.Contains(w.Body.String(), "vj1") {
		t.Fatalf("quarantined machine's config: %d %s", w.Code, w.Body)
	}
	if _, err := s.reg.Admit(ctx, mac, api.BootAdmitRequest{Profile: "default", HostName: "h3"}); err != nil {
		t.Fatal(err)
	}
	if w := post(t, tlsH, boothost.ConfigPath, boothost.Request{MAC: mac, Image: digest}); w.Code != http.StatusBadRequest {
		t.Fatalf("a request without a nonce: %d %s", w.Code, w.Body)
	}
	w = post(t, tlsH, boothost.ConfigPath, boothost.Request{MAC: mac, Image: digest, Nonce: nonce1})
	if w.Code != http.StatusOK {
		t.Fatalf("admitted machine's config: %d %s", w.Code, w.Body)
	}
	cfg, signed, err := bootconfig.Verify(w.Body.Bytes(), ca.Cert, mac, nonce1)
	if err != nil {
		t.Fatal(err)
	}
	fc := s.cluster.(*fakeCluster)
	if cfg.HostName != "h3" || !strings.Contains(cfg.JoinToken, fc.issued[0]) || cfg.Image != digest || cfg.Managers[0] != "https://10.77.0.1:7070" {
		t.Fatalf("config %+v", cfg)
	}
	m, _ := s.reg.Machine(ctx, mac)
	if m.Boots != 1 || m.LastConfig != signed.Digest() || m.LastImage != digest {
		t.Fatalf("machine after its configuration: %+v", m)
	}
	if b := m.LastBoot; b == nil || b.Script.IsZero() || b.Loaded.IsZero() || b.Configured.IsZero() || b.Loaded.Before(b.Script) {
		t.Fatalf("boot stages: %+v", b)
	}
	// Not again at once (each configuration mints a token)...
	if w := post(t, tlsH, boothost.ConfigPath, boothost.Request{MAC: mac, Nonce: nonce2}); w.Code != http.StatusTooManyRequests {
		t.Fatalf("a second configuration at once: %d %s", w.Code, w.Body)
	}
	// ...but at the next boot: a fresh token, and the last one revoked.
	clk.add(configEvery)
	w = post(t, tlsH, boothost.ConfigPath, boothost.Request{MAC: mac, Nonce: nonce2})
	cfg2, _, err := bootconfig.Verify(w.Body.Bytes(), ca.Cert, mac, nonce2)
	if err != nil || cfg2.JoinToken == cfg.JoinToken {
		t.Fatalf("the next boot's configuration: %v (token %s, before %s)", err, cfg2.JoinToken, cfg.JoinToken)
	}
	if len(fc.revoked) != 1 || fc.revoked[0] != fc.issued[0] {
		t.Fatalf("issued %v, revoked %v: want the first revoked", fc.issued, fc.revoked)
	}

	// Reports: recorded for machines that booted here, refused otherwise.
	if w := post(t, tlsH, boothost.ReportPath, boothost.Request{MAC: mac, Error: "signature does not verify"}); w.Code != http.StatusNoContent {
		t.Fatalf("report: %d %s", w.Code, w.Body)
	}
	if m, _ := s.reg.Machine(ctx, mac); m.LastError != "signature does not verify" {
		t.Fatalf("report not recorded: %+v", m)
	}
	post(t, tlsH, boothost.ReportPath, boothost.Request{MAC: mac, Error: "again at once"})
	if m, _ := s.reg.Machine(ctx, mac); m.LastError != "signature does not verify" {
		t.Fatalf("a report right after another was recorded: %+v", m)
	}
	if w := post(t, tlsH, boothost.ReportPath, boothost.Request{MAC: "52:54:00:99:99:99", Error: "x"}); w.Code != http.StatusNotFound {
		t.Fatalf("report from a stranger: %d", w.Code)
	}
	if ms, _ := s.reg.Machines(ctx); len(ms) != 1 {
		t.Fatalf("a report made a record: %+v", ms)
	}
	// Bad requests.
	for _, body := range []string{`{`, `{"mac":"nope"}`, `{"mac":"52:54:00:be:ee:01","extra":1}`} {
		w := httptest.NewRecorder()
		tlsH.ServeHTTP(w, httptest.NewRequest("POST", boothost.ConfigPath, strings.NewReader(body)))
		if w.Code != http.StatusBadRequest {
			t.Errorf("%s: %d", body, w.Code)
		}
	}
}

func TestUpperHalf(t *testing.T) {
	for _, tc := range []struct{ prefix, first, last string }{
		{"10.77.0.1/24", "10.77.0.128", "10.77.0.254"},
		{"192.168.0.1/16", "192.168.128.0", "192.168.255.254"},
	} {
		f, l := upperHalf(netip.MustParsePrefix(tc.prefix).Masked())
		if f.String() != tc.first || l.String() != tc.last {
			t.Errorf("%s: %s-%s, want %s-%s", tc.prefix, f, l, tc.first, tc.last)
		}
	}
}

func newDigest() interface {
	Write([]byte) (int, error)
	Sum([]byte) []byte
} {
	return sha256.New()
}

func FuzzDecodeRequest(f *testing.F) {
	f.Add([]byte(`{"mac":"52:54:00:be:ee:01","uuid":"x","image":"sha256:ab"}`))
	f.Add([]byte(`{"mac":"52:54:00:be:ee:01","error":"` + strings.Repeat("e", 5000) + `"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		req, err := decodeRequest(httptest.NewRequest("POST", boothost.ConfigPath, bytes.NewReader(b)))
		if err == nil && (len(req.Error) > 4096 || len(req.MAC) != 17) {
			t.Fatalf("accepted %q as %+v", b, req)
		}
	})
}

func noSkip(netip.Addr) bool { return false }

func TestLeasesExpire(t *testing.T) {
	reg := testRegistry(t)
	clk := &clock{t: time.Now()}
	reg.Now = clk.now
	ctx := context.Background()
	first, last := netip.MustParseAddr("10.77.0.10"), netip.MustParseAddr("10.77.0.11")
	a, _ := reg.leaseFor(ctx, "52:54:00:00:00:0a", first, last, noSkip)
	b, _ := reg.leaseFor(ctx, "52:54:00:00:00:0b", first, last, noSkip)
	if a == b || !a.IsValid() || !b.IsValid() {
		t.Fatalf("two machines got %s and %s", a, b)
	}
	if _, err := reg.leaseFor(ctx, "52:54:00:00:00:0c", first, last, noSkip); err == nil {
		t.Fatal("a third machine got an address of a full range")
	}
	// b keeps renewing; a goes silent past its lease.
	clk.add(leaseTime / 2)
	if again, _ := reg.leaseFor(ctx, "52:54:00:00:00:0b", first, last, noSkip); again != b {
		t.Fatalf("b renewing got %s, want %s", again, b)
	}
	clk.add(leaseTime/2 + time.Second)
	c, err := reg.leaseFor(ctx, "52:54:00:00:00:0c", first, last, noSkip)
	if err != nil || c != a {
		t.Fatalf("after a's lease expired, c got %s %v; want %s", c, err, a)
	}
	// a comes back: its address is c's now, and the range is full.
	if got, err := reg.leaseFor(ctx, "52:54:00:00:00:0a", first, last, noSkip); err == nil {
		t.Fatalf("a got %s from a full range", got)
	}
	// The range never includes what skip refuses.
	reg2 := testRegistry(t)
	if got, _ := reg2.leaseFor(ctx, "52:54:00:00:00:0d", first, last, func(ip netip.Addr) bool { return ip == first }); got != last {
		t.Fatalf("skipping %s, got %s", first, got)
	}
}

func TestUnknownMachinesAreBounded(t *testing.T) {
	reg := testRegistry(t)
	reg.MaxMachines = 3
	ctx := context.Background()
	for i := 0; i < 3; i++ {
		if _, err := reg.seen(ctx, fmt.Sprintf("52:54:00:00:01:%02x", i), Claims{UUID: strings.Repeat("x", 1000), IP: "10.77.0.9"}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := reg.seen(ctx, "52:54:00:00:01:ff", Claims{}); !errors.Is(err, ErrFull) {
		t.Fatalf("a fourth unknown machine: %v", err)
	}
	m, _ := reg.Machine(ctx, "52:54:00:00:01:00")
	if m.UUID != "" {
		t.Fatalf("a made-up uuid was kept: %q", m.UUID)
	}
	// Known machines are still seen; forgetting one makes room.
	if _, err := reg.seen(ctx, "52:54:00:00:01:01", Claims{IP: "10.77.0.8"}); err != nil {
		t.Fatal(err)
	}
	if err := reg.Forget(ctx, "52:54:00:00:01:00"); err != nil {
		t.Fatal(err)
	}
	if _, err := reg.seen(ctx, "52:54:00:00:01:ff", Claims{UUID: "6f1c2d3e-0000-4000-8000-0000000000b1"}); err != nil {
		t.Fatalf("after a forget: %v", err)
	}
	if m, _ := reg.Machine(ctx, "52:54:00:00:01:ff"); m.UUID != "6f1c2d3e-0000-4000-8000-0000000000b1" {
		t.Fatalf("a valid uuid was not kept: %+v", m)
	}
}
