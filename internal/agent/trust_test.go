package agent

import (
	"context"
	"crypto/tls"
	"log/slog"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/vigil-project/vigil/internal/events"
	"github.com/vigil-project/vigil/internal/hostproto"
	"github.com/vigil-project/vigil/internal/manager"
	"github.com/vigil-project/vigil/internal/pki"
	"github.com/vigil-project/vigil/internal/store"
)

// TestHostJoinsRegistersAndRenews runs a real manager (embedded etcd, its
// API over TLS) and a host's credentials against it: the host joins with a
// token (pinning the CA), registers over mutual TLS, and renews its
// short-lived certificate before it expires; the renewed certificate
// works, and the credentials survive a restart (load).
func TestHostJoinsRegistersAndRenews(t *testing.T) {
	if testing.Short() {
		t.Skip("starts etcd")
	}
	ctx := context.Background()
	e, err := store.StartEmbedded(ctx, t.TempDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	st := store.New(e.Client(), "/t/")
	id, err := managerIdentity(ctx, st, "m1", "127.0.0.1:0", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	const ttl = 4 * time.Second
	mgr := manager.New(manager.Config{Store: st, Events: events.New(100), Identity: id, CertTTL: ttl})
	// Not httptest's StartTLS: it would add its own certificate.
	ln, err := tls.Listen("tcp", "127.0.0.1:0", id.ServerTLS())
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: mgr.Handler()}
	go hs.Serve(ln)
	t.Cleanup(func() { hs.Close() })
	srv := struct{ URL string }{"https://" + ln.Addr().String()}
	tok, err := mgr.JoinToken(ctx, "")
	if err != nil {
		t.Fatal(err)
	}

	dir := t.TempDir()
	trust := &hostTrust{dir: dir, name: "h1", tlsDir: dir + "/tls"}
	reg := hostproto.Register{Addr: "127.0.0.1:9", FenceAfterMS: 5000}
	if err := trust.join(ctx, srv.URL, tok.Token, reg); err != nil {
		t.Fatalf("join: %v", err)
	}
	first := trust.holder.Leaf()
	if role, name := pki.Identity(first); role != pki.RoleHost || name != "h1" {
		t.Fatalf("joined as %s/%s", role, name)
	}
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: trust.clientTLS()}}
	j := &joiner{cfg: HostConfig{Name: "h1", Managers: []string{srv.URL}, FenceAfter: 5 * time.Second},
		log: slog.New(slog.DiscardHandler), addr: "127.0.0.1:9", host: &fencedHost{}, out: &outbox{wake: make(chan struct{}, 1)},
		http: hc, trust: trust, lastAck: time.Now()}
	if err := j.register(ctx); err != nil {
		t.Fatalf("register over mutual tls: %v", err)
	}
	// Half way through its life, the certificate is renewed.
	time.Sleep(time.Until(pki.RenewAfter(first)) + 100*time.Millisecond)
	j.renewIfDue(ctx)
	second := trust.holder.Leaf()
	if second.SerialNumber.Cmp(first.SerialNumber) == 0 || !second.NotAfter.After(first.NotAfter) {
		t.Fatalf("not renewed: %v until %v", second.SerialNumber, second.NotAfter)
	}
	// The first one has expired; the renewed one still gets through.
	time.Sleep(time.Until(first.NotAfter) + 200*time.Millisecond)
	if err := j.heartbeat(ctx); err != nil {
		t.Fatalf("heartbeat with the renewed certificate: %v", err)
	}
	// A restarted host loads what it saved.
	again := &hostTrust{dir: dir, name: "h1"}
	if ok, err := again.load(); !ok || err != nil || again.holder.Leaf().SerialNumber.Cmp(second.SerialNumber) != 0 {
		t.Fatalf("load after renewal: %v %v", ok, err)
	}
	// The same data dir under another name is refused, with what to do.
	other := &hostTrust{dir: dir, name: "h2"}
	if _, err := other.load(); err == nil || !strings.Contains(err.Error(), "not host \"h2\"") {
		t.Fatalf("credentials of h1 loaded as h2: %v", err)
	}
}
