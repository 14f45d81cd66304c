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

func TestConsoleTicketsAreOneUseForOneVM(t *testing.T) {
	ts := newTickets()
	now := time.Now()
	op := caller{Kind: "token", Name: "ops", Role: RoleOperator}
	id, err := ts.issue("web", op, now)
	if err != nil {
		t.Fatal(err)
	}
	other, _ := ts.issue("web", op, now)
	late, _ := ts.issue("web", op, now)
	tests := []struct {
		name, id, vm string
		at           time.Time
		ok           bool
	}{
		{"good", id, "web", now.Add(time.Second), true},
		{"used twice", id, "web", now.Add(time.Second), false},
		{"another vm", other, "db", now, false},
		{"after the wrong vm", other, "web", now, false}, // one try, right or wrong
		{"expired", late, "web", now.Add(ticketTTL + time.Second), false},
		{"unknown", "nope", "web", now, false},
		{"empty", "", "web", now, false},
	}
	for _, tc := range tests {
		c, err := ts.redeem(tc.id, tc.vm, tc.at)
		if (err == nil) != tc.ok {
			t.Errorf("%s: err %v, want ok=%v", tc.name, err, tc.ok)
		}
		if tc.ok && c != op {
			t.Errorf("%s: ticket redeemed as %+v, want %+v", tc.name, c, op)
		}
	}
}

func TestConsoleTicketsAreBounded(t *testing.T) {
	ts := newTickets()
	now := time.Now()
	for i := 0; i < maxTickets; i++ {
		if _, err := ts.issue("web", caller{}, now); err != nil {
			t.Fatalf("ticket %d: %v", i, err)
		}
	}
	if _, err := ts.issue("web", caller{}, now); err == nil {
		t.Fatal("issued more tickets than maxTickets")
	}
	// Expired ones make room.
	if _, err := ts.issue("web", caller{}, now.Add(ticketTTL+time.Second)); err != nil {
		t.Fatalf("after the others expired: %v", err)
	}
}

// TestVNCWebSocket opens a VM's console as the dashboard does: a ticket
// with an operator's token, then a WebSocket with the ticket (the fake
// host's console echoes). A viewer gets no ticket; a ticket works once;
// another site's page cannot open it; every opening is audited.
func TestVNCWebSocket(t *testing.T) {
	m, _ := newTestManager(t)
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

	// A page of another site is refused (and the ticket is spent: one try).
	_, resp, err := websocket.Dial(ctx, wsURL, &websocket.DialOptions{HTTPHeader: http.Header{"Origin": {"https://evil.example"}}})
	if err == nil || resp == nil || resp.StatusCode != http.StatusForbidden {
		t.Fatalf("a cross-origin open: err %v, resp %v; want 403", err, resp)
	}
	_, tk = ticket(op)
	wsURL = "ws" + strings.TrimPrefix(srv.URL, "http") + "/v1/vms/web/vnc/websocket?ticket=" + tk.Ticket
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
	// Audited: the opening by the operator's token, the refusals.
	deadline := time.Now().Add(5 * time.Second)
	for {
		es, err := m.Audit(ctx, 50)
		if err != nil {
			t.Fatal(err)
		}
		var opened, refused int
		for _, e := range es {
			if strings.HasSuffix(e.Action, "/vnc/websocket") {
				switch {
				case e.Status == http.StatusSwitchingProtocols && e.Actor == "token:ops":
					opened++
				case e.Status == http.StatusUnauthorized:
					refused++
				}
			}
		}
		if opened == 1 && refused >= 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("audit: %d openings, %d refusals of the console websocket", opened, refused)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestDashboardRoutes: the dashboard's files need no token (the page signs
// in), carry a CSP; the usage history and the hosts' reservations are
// served to a viewer.
func TestDashboardRoutes(t *testing.T) {
	m, _ := newTestManager(t)
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
	code, body = request(t, m, "GET", "/v1/vms/web/usage", "", viewer, nil)
	if err := json.Unmarshal([]byte(body), &u); code != http.StatusOK || err != nil || len(u.Samples) != 0 {
		t.Fatalf("usage of a stopped vm: %d %s", code, body)
	}
}
