package manager

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/vigil-project/vigil/api"
)

func TestPassesAreOneUseForOneScope(t *testing.T) {
	ps := newPasses()
	now := time.Now()
	op := caller{Kind: "token", Name: "ops", Role: RoleOperator, TokenID: "t1"}
	id, err := ps.issue("a", op, time.Minute, now)
	if err != nil {
		t.Fatal(err)
	}
	other, _ := ps.issue("a", op, time.Minute, now)
	late, _ := ps.issue("a", op, time.Minute, now)
	tests := []struct {
		name, id, scope string
		at              time.Time
		ok              bool
		who             caller // who the refusal names
	}{
		{"good", id, "a", now.Add(time.Second), true, op},
		{"used twice", id, "a", now.Add(time.Second), false, caller{}},
		{"another scope", other, "b", now, false, op},
		{"after the wrong scope", other, "a", now, false, caller{}}, // one try, right or wrong
		{"expired", late, "a", now.Add(time.Minute + time.Second), false, op},
		{"unknown", "nope", "a", now, false, caller{}},
		{"empty", "", "a", now, false, caller{}},
	}
	for _, tc := range tests {
		c, err := ps.redeem(tc.id, tc.scope, tc.at)
		if (err == nil) != tc.ok {
			t.Errorf("%s: err %v, want ok=%v", tc.name, err, tc.ok)
		}
		if c != tc.who {
			t.Errorf("%s: redeemed as %+v, want %+v", tc.name, c, tc.who)
		}
	}
}

func TestPassesAreBoundedPerCaller(t *testing.T) {
	ps := newPasses()
	now := time.Now()
	a, b := caller{Kind: "token", Name: "a", TokenID: "1"}, caller{Kind: "token", Name: "b", TokenID: "2"}
	for i := 0; i < maxPassesEach; i++ {
		if _, err := ps.issue("x", a, time.Minute, now); err != nil {
			t.Fatalf("pass %d: %v", i, err)
		}
	}
	if _, err := ps.issue("x", a, time.Minute, now); err == nil {
		t.Fatal("one caller got more than maxPassesEach passes")
	}
	if _, err := ps.issue("x", b, time.Minute, now); err != nil {
		t.Fatalf("another caller is locked out: %v", err)
	}
	// Expired ones make room.
	if _, err := ps.issue("x", a, time.Minute, now.Add(2*time.Minute)); err != nil {
		t.Fatalf("after the others expired: %v", err)
	}
}

// TestVNCWebSocket opens a VM's console as the dashboard does: a ticket
// with an operator's token, then a WebSocket with the ticket (the fake
// host's console echoes). A viewer gets no ticket; a ticket works once;
// another site's page cannot open it; every opening is audited.
func TestVNCWebSocket(t *testing.T) {
	m, h := newTestManager(t)
	ctx := context.Background()
	if _, err := m.Create(ctx, api.VMCreateRequest{Name: "web", MemoryBytes: 128 << 20, CPUs: 1, DiskBytes: 256 << 20, Start: true}); err != nil {
		t.Fatal(err)
	}
	op, viewer := token(t, m, "ops", RoleOperator, 0), token(t, m, "watch", RoleViewer, 0)
	srv := httptest.NewServer(m.Handler())
	t.Cleanup(srv.Close)
	ticket := func(bearer string) (int, api.ConsoleTicket) {
		req, _ := http.NewRequest("POST", srv.URL+"/v1/vms/web/vnc/tickets", nil)
		req.Header.Set("Authorization", "Bearer "+bearer)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var tk api.ConsoleTicket
		json.NewDecoder(resp.Body).Decode(&tk)
		return resp.StatusCode, tk
	}
	if code, _ := ticket(viewer); code != http.StatusForbidden {
		t.Fatalf("a viewer asked for a console ticket: %d, want 403", code)
	}
	code, tk := ticket(op)
	if code != http.StatusCreated || tk.Ticket == "" || tk.ExpiresInSeconds <= 0 {
		t.Fatalf("ticket: %d %+v", code, tk)
	}
	wsURL := "ws" + strings.TrimPrefix(srv.URL, "http") + "/v1/vms/web/vnc/websocket?ticket=" + tk.Ticket

	// A page of another site is refused before the ticket is spent or the
	// host called; so is a plain GET.
	_, resp, err := websocket.Dial(ctx, wsURL, &websocket.DialOptions{HTTPHeader: http.Header{"Origin": {"https://evil.example"}}})
	if err == nil || resp == nil || resp.StatusCode != http.StatusForbidden {
		t.Fatalf("a cross-origin open: err %v, resp %v; want 403", err, resp)
	}
	if r, err := http.Get(strings.Replace(wsURL, "ws", "http", 1)); err != nil || r.StatusCode != http.StatusBadRequest {
		t.Fatalf("a plain GET: %v %v; want 400", r, err)
	}
	if h.called("vnc web") {
		t.Fatal("the host's console was opened for a refused request")
	}
	c, _, err := websocket.Dial(ctx, wsURL, &websocket.DialOptions{Subprotocols: []string{"binary"}})
	if err != nil {
		t.Fatalf("open the console: %v", err)
	}
	if c.Subprotocol() != "binary" {
		t.Errorf("subprotocol %q, want binary (noVNC asks for it)", c.Subprotocol())
	}
	msg := []byte("RFB 003.008\n")
	if err := c.Write(ctx, websocket.MessageBinary, msg); err != nil {
		t.Fatal(err)
	}
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	var got []byte
	for len(got) < len(msg) {
		_, b, err := c.Read(rctx)
		if err != nil {
			t.Fatalf("read the echo: %v", err)
		}
		got = append(got, b...)
	}
	if !bytes.Equal(got, msg) {
		t.Fatalf("echo %q, want %q", got, msg)
	}
	c.Close(websocket.StatusNormalClosure, "")

	// The same ticket again: refused.
	if _, resp, err := websocket.Dial(ctx, wsURL, nil); err == nil || resp == nil || resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("a used ticket: err %v, resp %v; want 401", err, resp)
	}
	// A ticket dies with its token.
	_, tk = ticket(op)
	if code, _ := request(t, m, "DELETE", "/v1/tokens/ops", "", token(t, m, "root", RoleAdmin, 0), nil); code != http.StatusNoContent {
		t.Fatalf("revoke: %d", code)
	}
	wsURL = "ws" + strings.TrimPrefix(srv.URL, "http") + "/v1/vms/web/vnc/websocket?ticket=" + tk.Ticket
	if _, resp, err := websocket.Dial(ctx, wsURL, nil); err == nil || resp == nil || resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("a revoked token's ticket: err %v, resp %v; want 401", err, resp)
	}
	// Audited: the opening by the operator's token, each refusal with its
	// status and, where the ticket names one, its holder.
	deadline := time.Now().Add(5 * time.Second)
	for {
		es, err := m.Audit(ctx, 50)
		if err != nil {
			t.Fatal(err)
		}
		got := map[int]int{}
		var opened bool
		for _, e := range es {
			if strings.HasSuffix(e.Action, "/vnc/websocket") {
				got[e.Status]++
				opened = opened || e.Status == http.StatusSwitchingProtocols && e.Actor == "token:ops"
			}
		}
		if opened && got[http.StatusForbidden] == 1 && got[http.StatusBadRequest] == 1 && got[http.StatusUnauthorized] == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("audit of the console websocket: statuses %v, opened by ops %v", got, opened)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestSignInLink: a token's holder asks for a link; its code gives the
// browser a token of the same role, once; it is audited as the link's
// maker, and does not outlive the token that made it.
func TestSignInLink(t *testing.T) {
	m, _ := newTestManager(t)
	op := token(t, m, "ops", RoleOperator, time.Hour)
	link := func(bearer string) api.SignInLink {
		code, body := request(t, m, "POST", "/v1/ui/links", "", bearer, nil)
		var l api.SignInLink
		if err := json.Unmarshal([]byte(body), &l); code != http.StatusCreated || err != nil || l.Code == "" {
			t.Fatalf("link: %d %s", code, body)
		}
		return l
	}
	l := link(op)
	code, body := request(t, m, "POST", "/v1/ui/sessions", `{"code":"`+l.Code+`"}`, "", nil)
	var tok api.TokenCreated
	if err := json.Unmarshal([]byte(body), &tok); code != http.StatusCreated || err != nil {
		t.Fatalf("sign in: %d %s", code, body)
	}
	if tok.Info.Role != RoleOperator || !strings.HasPrefix(tok.Info.Name, "ui-ops-") || tok.Info.Expires == nil ||
		tok.Info.Expires.After(time.Now().Add(time.Hour+time.Minute)) {
		t.Fatalf("the browser's token: %+v (want operator, named ui-ops-*, expiring with the link's token)", tok.Info)
	}
	if code, _ := request(t, m, "GET", "/v1/vms", "", tok.Token, nil); code != http.StatusOK {
		t.Fatalf("the browser's token does not work: %d", code)
	}
	if code, _ := request(t, m, "POST", "/v1/ui/sessions", `{"code":"`+l.Code+`"}`, "", nil); code != http.StatusUnauthorized {
		t.Fatalf("a code used twice: %d", code)
	}
	if code, _ := request(t, m, "POST", "/v1/ui/links", "", "", nil); code != http.StatusUnauthorized {
		t.Fatalf("a link without a token: %d", code)
	}
	es, err := m.Audit(context.Background(), 50)
	if err != nil {
		t.Fatal(err)
	}
	var ok, refused bool
	for _, e := range es {
		if e.Action == "POST /v1/ui/sessions" {
			ok = ok || e.Status == http.StatusCreated && e.Actor == "token:ops"
			refused = refused || e.Status == http.StatusUnauthorized
		}
	}
	if !ok || !refused {
		t.Fatalf("audit of sign-ins: created by ops %v, refusal %v: %+v", ok, refused, es)
	}
}

// TestDashboardRoutes: the dashboard's files need no token (the page signs
// in), carry a CSP; the usage history and the hosts' reservations are
// served to a viewer.
func TestDashboardRoutes(t *testing.T) {
	m, h := newTestManager(t)
	ctx := context.Background()
	if _, err := m.Create(ctx, api.VMCreateRequest{Name: "web", MemoryBytes: 128 << 20, CPUs: 1, DiskBytes: 256 << 20, Start: true}); err != nil {
		t.Fatal(err)
	}
	viewer := token(t, m, "watch", RoleViewer, 0)

	code, body := request(t, m, "GET", "/ui/", "", "", nil)
	if code != http.StatusOK || !strings.Contains(body, `<script type="module" src="app.js">`) {
		t.Fatalf("GET /ui/ without a token: %d %.200s", code, body)
	}
	req := httptest.NewRequest("GET", "/", nil)
	w := httptest.NewRecorder()
	m.Handler().ServeHTTP(w, req)
	if w.Code != http.StatusFound || w.Header().Get("Location") != "/ui/" {
		t.Fatalf("GET /: %d to %q, want a redirect to /ui/", w.Code, w.Header().Get("Location"))
	}
	if code, _ := request(t, m, "GET", "/v1/vms/web/usage", "", "", nil); code != http.StatusUnauthorized {
		t.Fatalf("usage without a token: %d", code)
	}
	code, body = request(t, m, "GET", "/v1/vms/web/usage", "", viewer, nil)
	var u api.UsageHistory
	if err := json.Unmarshal([]byte(body), &u); code != http.StatusOK || err != nil || len(u.Samples) != 2 || u.Samples[1].CPUSeconds != 2 {
		t.Fatalf("usage: %d %s", code, body)
	}
	code, body = request(t, m, "GET", "/v1/hosts", "", viewer, nil)
	var hs []api.Host
	if err := json.Unmarshal([]byte(body), &hs); code != http.StatusOK || err != nil || len(hs) != 1 {
		t.Fatalf("hosts: %d %s", code, body)
	}
	if hs[0].ReservedMemoryBytes != 128<<20 || hs[0].ReservedCPUs != 1 {
		t.Fatalf("host reservations: %d bytes, %d vcpus; want the vm's 128 MiB and 1", hs[0].ReservedMemoryBytes, hs[0].ReservedCPUs)
	}
	// A stopped VM has no usage to show, and no host call is made.
	if _, err := m.ChangeState(ctx, "web", api.VMStateRequest{Action: api.ActionStop, Force: true}); err != nil {
		t.Fatal(err)
	}
	before := strings.Count(h.callsString(), "usage web")
	code, body = request(t, m, "GET", "/v1/vms/web/usage", "", viewer, nil)
	if err := json.Unmarshal([]byte(body), &u); code != http.StatusOK || err != nil || len(u.Samples) != 0 {
		t.Fatalf("usage of a stopped vm: %d %s", code, body)
	}
	if strings.Count(h.callsString(), "usage web") != before {
		t.Fatal("the host was asked for the usage of a stopped vm")
	}
}
