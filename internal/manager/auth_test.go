package manager

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/hostproto"
	"github.com/vigil-project/vigil/internal/pki"
)

// request sends one API request with bearer (if any) and peer (a verified
// client certificate, if any) and returns the status.
func request(t *testing.T, m *Manager, method, path, body, bearer string, peer *x509.Certificate) (int, string) {
	t.Helper()
	req := httptest.NewRequest(method, path, strings.NewReader(body))
	if bearer != "" {
		req.Header.Set("Authorization", "Bearer "+bearer)
	}
	if peer != nil {
		req.TLS = &tls.ConnectionState{VerifiedChains: [][]*x509.Certificate{{peer}}}
	}
	w := httptest.NewRecorder()
	m.Handler().ServeHTTP(w, req)
	return w.Code, w.Body.String()
}

func token(t *testing.T, m *Manager, name, role string, ttl time.Duration) string {
	t.Helper()
	tok, err := m.CreateToken(context.Background(), api.TokenCreateRequest{Name: name, Role: role, TTLSeconds: int64(ttl.Seconds())}, "test")
	if err != nil {
		t.Fatal(err)
	}
	return tok.Token
}

// TestAuthRoles: no token, a bad one, a revoked or expired one is 401; a
// role without the right is 403; each role can do what it is for.
func TestAuthRoles(t *testing.T) {
	m, _ := newTestManager(t)
	mustCreate(t, m, "v", false)
	viewer := token(t, m, "v1", RoleViewer, 0)
	operator := token(t, m, "o1", RoleOperator, 0)
	admin := token(t, m, "a1", RoleAdmin, 0)
	expired := token(t, m, "e1", RoleAdmin, time.Second)
	revoked := token(t, m, "r1", RoleAdmin, 0)
	if err := m.RevokeToken(context.Background(), "r1"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(1100 * time.Millisecond)
	forged := pki.NewAPIToken().String()
	stolen, _ := pki.ParseAPIToken(viewer)
	wrongSecret := pki.APIToken{ID: stolen.ID, Secret: strings.Repeat("0", 64)}.String()

	tests := []struct {
		name, method, path, body, bearer string
		want                             int
	}{
		{"no token", "GET", "/v1/vms", "", "", 401},
		{"garbage", "GET", "/v1/vms", "", "hello", 401},
		{"unknown token", "GET", "/v1/vms", "", forged, 401},
		{"known id, wrong secret", "GET", "/v1/vms", "", wrongSecret, 401},
		{"revoked", "GET", "/v1/vms", "", revoked, 401},
		{"expired", "GET", "/v1/vms", "", expired, 401},
		{"viewer reads", "GET", "/v1/vms/v", "", viewer, 200},
		{"viewer reads events", "GET", "/v1/events", "", viewer, 200},
		{"viewer cannot start", "PUT", "/v1/vms/v/state", `{"action":"start"}`, viewer, 403},
		{"viewer cannot exec", "POST", "/v1/vms/v/exec", `{"command":"id"}`, viewer, 403},
		{"viewer cannot read the console", "GET", "/v1/vms/v/console", "", viewer, 403},
		{"operator starts", "PUT", "/v1/vms/v/state", `{"action":"start"}`, operator, 200},
		{"operator cannot make tokens", "POST", "/v1/tokens", `{"name":"x","role":"admin"}`, operator, 403},
		{"operator cannot make join tokens", "POST", "/v1/hosts/join-tokens", "", operator, 403},
		{"admin lists tokens", "GET", "/v1/tokens", "", admin, 200},
		{"admin makes a join token", "POST", "/v1/hosts/join-tokens", "", admin, 201},
		{"a user is not a host", "POST", "/v1/hosts/h1/heartbeat", `{}`, admin, 401},
		{"health needs nothing", "GET", "/v1/health", "", "", 200},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if code, body := request(t, m, tt.method, tt.path, tt.body, tt.bearer, nil); code != tt.want {
				t.Fatalf("%s %s: %d %s, want %d", tt.method, tt.path, code, body, tt.want)
			}
		})
	}
	// Tokens are listed without secrets.
	_, body := request(t, m, "GET", "/v1/tokens", "", admin, nil)
	if strings.Contains(body, "hash") || strings.Contains(body, stolen.Secret) {
		t.Fatalf("token list shows secrets: %s", body)
	}
}

// TestAuditTrail: mutations, refusals included, are recorded with who did
// them and the result, on the event stream and in the store.
func TestAuditTrail(t *testing.T) {
	m, _ := newTestManager(t)
	_, ch, cancel := m.Events().Subscribe(0)
	defer cancel()
	op := token(t, m, "ops", RoleOperator, 0)
	viewer := token(t, m, "looker", RoleViewer, 0)
	request(t, m, "POST", "/v1/vms", `{"name":"a","memory_bytes":134217728,"cpus":1,"disk_bytes":268435456}`, op, nil)
	request(t, m, "DELETE", "/v1/vms/a", "", viewer, nil)
	request(t, m, "GET", "/v1/vms", "", viewer, nil) // reads are not audited
	want := []string{"token:ops POST /v1/vms 201", "token:looker DELETE /v1/vms/a 403"}
	var got []string
	timeout := time.After(3 * time.Second)
	for len(got) < len(want) {
		select {
		case e := <-ch:
			if e.Type == "audit" && e.Audit != nil {
				got = append(got, fmt.Sprintf("%s %s %d", e.Audit.Actor, e.Audit.Action, e.Audit.Status))
			}
		case <-timeout:
			t.Fatalf("audit events %q, want %q", got, want)
		}
	}
	if strings.Join(got, "|") != strings.Join(want, "|") {
		t.Fatalf("audit events %q, want %q", got, want)
	}
	waitFor(t, func() bool {
		es, err := m.Audit(context.Background(), 10)
		return err == nil && len(es) == 2 && es[0].VM == "a" && es[1].Error != ""
	})
}

// hostCert issues a host certificate of the manager's CA.
func hostCert(t *testing.T, m *Manager, name string) *x509.Certificate {
	t.Helper()
	cert, _, err := m.identity.CA.Issue(pki.Profile{Role: pki.RoleHost, Name: name})
	if err != nil {
		t.Fatal(err)
	}
	c, _ := pki.ParseCert(cert)
	return c
}

func csr(t *testing.T, name string) string {
	t.Helper()
	key, _, _ := pki.NewKey()
	b, err := pki.NewCSR(key, name)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestJoinCannotTakeAName: a host with a fresh join token cannot register
// under a registered host's name (nor reuse a token); a token made for
// that name can, and the certificate names only what the manager decides.
func TestJoinCannotTakeAName(t *testing.T) {
	m, _ := newTestManager(t)
	ctx := context.Background()
	reg := hostproto.Register{Addr: "127.0.0.1:7071", FenceAfterMS: 5000}
	join := func(name, tok string) (hostproto.Joined, error) {
		return m.Join(ctx, hostproto.Join{Name: name, Token: tok, CSR: csr(t, "h-evil"), Register: reg})
	}
	first, _ := m.JoinToken(ctx, "")
	joined, err := join("h7", first.Token)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := pki.ParseCert([]byte(joined.Cert))
	if role, name := pki.Identity(cert); role != pki.RoleHost || name != "h7" {
		t.Fatalf("certificate for %s/%s, want vigil-hosts/h7", role, name)
	}
	if _, err := join("h8", first.Token); !errors.Is(err, ErrUnauthorized) || !strings.Contains(err.Error(), "already used") {
		t.Fatalf("a used token joined again: %v", err)
	}
	second, _ := m.JoinToken(ctx, "")
	if _, err := join("h7", second.Token); !errors.Is(err, ErrForbidden) || !strings.Contains(err.Error(), "already registered") {
		t.Fatalf("a fresh token took a registered host's name: %v", err)
	}
	bound, _ := m.JoinToken(ctx, "h7")
	if _, err := join("h9", bound.Token); !errors.Is(err, ErrUnauthorized) {
		t.Fatalf("a token bound to h7 admitted h9: %v", err)
	}
	if _, err := join("h7", bound.Token); err != nil {
		t.Fatalf("a token made for h7 could not re-admit it: %v", err)
	}
	bad := first
	bad.Token = strings.Replace(first.Token, first.Token[4:8], "0000", 1)
	if _, err := join("h10", bad.Token); !errors.Is(err, ErrUnauthorized) {
		t.Fatalf("a forged token: %v", err)
	}
}

// TestHostActsOnlyForItself: a host's certificate names it; it cannot
// heartbeat, renew or report as another host, and events it sends as
// another host are dropped and audited.
func TestHostActsOnlyForItself(t *testing.T) {
	m, fake := newTestManager(t)
	ctx := context.Background()
	for _, n := range []string{"ha", "hb"} {
		tok, _ := m.JoinToken(ctx, "")
		if _, err := m.Join(ctx, hostproto.Join{Name: n, Token: tok.Token, CSR: csr(t, n),
			Register: hostproto.Register{Addr: "127.0.0.1:1", FenceAfterMS: 5000}}); err != nil {
			t.Fatal(err)
		}
	}
	ha := hostCert(t, m, "ha")
	for _, p := range []string{"/v1/hosts/hb/heartbeat", "/v1/hosts/hb/heartbeat/same", "/v1/hosts/hb/certificate"} {
		if code, body := request(t, m, "POST", p, `{}`, "", ha); code != http.StatusForbidden {
			t.Fatalf("host ha on %s: %d %s, want 403", p, code, body)
		}
	}
	manager := hostCertAs(t, m, pki.RoleManager, "m2")
	if code, _ := request(t, m, "POST", "/v1/hosts/ha/heartbeat", `{}`, "", manager); code != http.StatusForbidden {
		t.Fatalf("a manager's certificate on a host endpoint: %d, want 403", code)
	}
	// ha reports a crash of h1's VM "v", as if h1 had sent it.
	mustCreate(t, m, "v", true)
	hb := hostproto.Heartbeat{Events: []hostproto.Event{{Host: "h1", VM: "v", Kind: hostproto.EventExited,
		Incident: &hostproto.Incident{Kind: hostproto.IncidentExit, DetectedAt: time.Now()}}}}
	b, _ := json.Marshal(hb)
	if code, body := request(t, m, "POST", "/v1/hosts/ha/heartbeat", string(b), "", ha); code != http.StatusNoContent {
		t.Fatalf("ha's own heartbeat: %d %s", code, body)
	}
	// Its own Same, through the route for them: a report it never sent
	// is a 409, one it sent stands.
	same, _ := json.Marshal(hostproto.Heartbeat{Same: 41})
	if code, body := request(t, m, "POST", "/v1/hosts/ha/heartbeat/same", string(same), "", ha); code != http.StatusConflict {
		t.Fatalf("ha's Same for a report never sent: %d %s, want 409", code, body)
	}
	full, _ := json.Marshal(hostproto.Heartbeat{Report: 41})
	if code, body := request(t, m, "POST", "/v1/hosts/ha/heartbeat", string(full), "", ha); code != http.StatusNoContent {
		t.Fatalf("ha's report 41: %d %s", code, body)
	}
	if code, body := request(t, m, "POST", "/v1/hosts/ha/heartbeat/same", string(same), "", ha); code != http.StatusNoContent {
		t.Fatalf("ha's Same for report 41: %d %s", code, body)
	}
	time.Sleep(300 * time.Millisecond)
	if fake.called("restart v") {
		t.Fatal("an event host ha sent as h1 restarted h1's vm")
	}
	waitFor(t, func() bool {
		es, _ := m.Audit(ctx, 50)
		for _, e := range es {
			if e.Actor == "host:ha" && e.Status == http.StatusForbidden && strings.Contains(e.Error, "as host h1") {
				return true
			}
		}
		return false
	})
}

func hostCertAs(t *testing.T, m *Manager, role, name string) *x509.Certificate {
	t.Helper()
	cert, _, err := m.identity.CA.Issue(pki.Profile{Role: role, Name: name})
	if err != nil {
		t.Fatal(err)
	}
	c, _ := pki.ParseCert(cert)
	return c
}

// TestHostErrorsKeepTheirStatus: what a host answers maps to the API's
// status, in process and over the wire alike (a disk in use is 409).
func TestHostErrorsKeepTheirStatus(t *testing.T) {
	m, h := newTestManager(t)
	mustCreate(t, m, "v", false)
	admin := token(t, m, "adm", RoleAdmin, 0)
	h.fail("start", fmt.Errorf("v: %w (pool/vms/v/disk.qcow2)", hostproto.ErrDiskInUse))
	code, body := request(t, m, "PUT", "/v1/vms/v/state", `{"action":"start"}`, admin, nil)
	if code != http.StatusConflict || !strings.Contains(body, "in use") {
		t.Fatalf("a start refused for a disk in use: %d %s, want 409", code, body)
	}
}

// TestAuditEntryLandsWithTheOutcome: an audited call on a VM writes its
// entry in the transaction that writes the operation's outcome, once.
func TestAuditEntryLandsWithTheOutcome(t *testing.T) {
	m, h := newTestManager(t)
	ctx := context.Background()
	op := token(t, m, "ops", RoleOperator, 0)
	if code, body := request(t, m, "POST", "/v1/vms", `{"name":"a","memory_bytes":134217728,"cpus":1,"disk_bytes":268435456,"start":true}`, op, nil); code != 201 {
		t.Fatalf("create: %d %s", code, body)
	}
	cli := m.store.Client()
	start, err := cli.Get(ctx, "/test/")
	if err != nil {
		t.Fatal(err)
	}
	if code, body := request(t, m, "PUT", "/v1/vms/a/state", `{"action":"pause"}`, op, nil); code != 200 {
		t.Fatalf("pause: %d %s", code, body)
	}
	end, err := cli.Get(ctx, "/test/")
	if err != nil {
		t.Fatal(err)
	}
	hist, err := cli.Get(ctx, "/test/audit/", clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	var pauseRev int64
	for _, kv := range hist.Kvs {
		if kv.ModRevision > start.Header.Revision && kv.ModRevision <= end.Header.Revision {
			if pauseRev != 0 {
				t.Fatal("the pause was audited twice")
			}
			pauseRev = kv.ModRevision
		}
	}
	rec, err := cli.Get(ctx, "/test/"+vmKey("a"))
	if err != nil || len(rec.Kvs) == 0 {
		t.Fatal(err)
	}
	if pauseRev == 0 || rec.Kvs[0].ModRevision != pauseRev {
		t.Fatalf("audit entry at revision %d, the paused record at %d: want one transaction", pauseRev, rec.Kvs[0].ModRevision)
	}
	// A resume the host fails (on the lock the pause kept), and a start
	// the host fails (an operation that records its outcome, stopped, and
	// answers an error), are each on record once, as the failure they were.
	codes := []int{201, 200}
	call := func(body string) int {
		code, _ := request(t, m, "PUT", "/v1/vms/a/state", body, op, nil)
		codes = append(codes, code)
		return code
	}
	call(`{"action":"resume"}`)
	call(`{"action":"pause"}`)
	h.fail("resume", errors.New("qemu is wedged"))
	if code := call(`{"action":"resume"}`); code < 400 {
		t.Fatalf("a resume the host failed answered %d", code)
	}
	if code := call(`{"action":"stop","force":true}`); code != 200 {
		t.Fatalf("stop: %d", code)
	}
	h.fail("start", errors.New("no room"))
	if code := call(`{"action":"start"}`); code < 400 {
		t.Fatalf("a start the host failed answered %d", code)
	}
	var want, got []string
	for i, c := range codes {
		a := "PUT /v1/vms/a/state"
		if i == 0 {
			a = "POST /v1/vms"
		}
		want = append(want, fmt.Sprintf("%s %d", a, c))
	}
	deadline := time.Now().Add(3 * time.Second)
	for {
		es, err := m.Audit(ctx, 20)
		if err != nil {
			t.Fatal(err)
		}
		got = got[:0]
		for _, e := range es {
			got = append(got, fmt.Sprintf("%s %d", e.Action, e.Status))
		}
		if strings.Join(got, "|") == strings.Join(want, "|") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("audit trail:\n got %q\nwant %q (one entry per call, with its status)", got, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
