package manager

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/coder/websocket"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/hostproto"
)

// What the web dashboard needs beyond the REST API every client uses: a
// VM's usage history for its charts; its VNC console as a WebSocket (what
// noVNC speaks), opened with a one-use ticket the page asks for with its
// token; and sign-in links, whose one-use code the page exchanges for a
// token of its own (see passes.go).

const (
	ticketTTL = 30 * time.Second
	// A sign-in link works once, for a short while; the token it gives
	// the browser lasts a working day.
	linkTTL    = 2 * time.Minute
	sessionTTL = 12 * time.Hour
)

func consoleScope(vm string) string { return "the console of vm " + vm }

const signInScope = "a dashboard sign-in"

// handleVNCTicket gives the caller a ticket for the VM's VNC WebSocket.
func (m *Manager) handleVNCTicket(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	if _, err := m.Get(r.Context(), name); err != nil {
		writeError(w, m.log, err)
		return
	}
	id, err := m.passes.issue(consoleScope(name), callerOf(r), ticketTTL, time.Now())
	if err != nil {
		writeError(w, m.log, err)
		return
	}
	writeJSON(w, http.StatusCreated, api.ConsoleTicket{Ticket: id, ExpiresInSeconds: int(ticketTTL / time.Second)})
}

// sameOrigin says whether a browser's request comes from a page of this
// manager (a request without Origin is not a browser's).
func sameOrigin(r *http.Request) bool {
	o := r.Header.Get("Origin")
	if o == "" {
		return true
	}
	u, err := url.Parse(o)
	return err == nil && strings.EqualFold(u.Host, r.Host)
}

// handleVNCWebSocket carries the VM's VNC console over a WebSocket (binary
// messages), for a caller holding a ticket. The browser's Origin must be
// this manager's (no other site may open it with the user's ticket).
func (m *Manager) handleVNCWebSocket(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	e := api.AuditEntry{Time: time.Now(), Actor: "anonymous", Action: r.Method + " " + r.URL.Path, VM: name,
		Status: http.StatusSwitchingProtocols, Remote: r.RemoteAddr}
	fail := func(err error) {
		e.Status, _ = statusOf(err)
		e.Error = err.Error()
		m.audit(e)
		writeError(w, m.log, err)
	}
	// What is not a WebSocket from this manager's page is refused before
	// the ticket is spent or a host is called.
	if !hostproto.HeaderHas(r.Header, "Upgrade", "websocket") {
		fail(errorf(ErrInvalid, "this is a WebSocket endpoint (the dashboard's console): send \"Upgrade: websocket\""))
		return
	}
	if !sameOrigin(r) {
		fail(errorf(ErrForbidden, "a page of %s may not open this manager's console", r.Header.Get("Origin")))
		return
	}
	c, err := m.passes.redeem(r.URL.Query().Get("ticket"), consoleScope(name), time.Now())
	if c.Kind != "" {
		e.Actor, e.Role = c.String(), c.Role
	}
	if err == nil {
		err = m.stillValid(c)
	}
	if err == nil && !authorized(c.Role, RoleOperator) {
		err = errorf(ErrForbidden, "token %s has role %s; the console needs %s", c.Name, c.Role, RoleOperator)
	}
	if err != nil {
		fail(err)
		return
	}
	vm, err := m.Get(r.Context(), name)
	if err == nil && vm.State != api.StateRunning && vm.State != api.StatePaused {
		err = errorf(ErrConflict, "vm %s is %s: only a running or paused vm has a screen", name, vm.State)
	}
	if err != nil {
		fail(err)
		return
	}
	octx, cancel := context.WithTimeout(r.Context(), 30*time.Second)
	conn, err := hostproto.VNC.Open(octx, m.hostNamed(vm.Host), hostproto.VMRef{VM: name})
	cancel()
	if err != nil {
		fail(fmt.Errorf("vnc of vm %s: %w", name, err))
		return
	}
	defer conn.Close()
	// The session outlives the server's request deadlines.
	rc := http.NewResponseController(w)
	rc.SetReadDeadline(time.Time{})
	rc.SetWriteDeadline(time.Time{})
	ws, err := websocket.Accept(w, r, &websocket.AcceptOptions{Subprotocols: []string{"binary"}})
	if err != nil {
		// Accept answered the client itself (a malformed handshake).
		e.Status, e.Error = http.StatusBadRequest, "websocket: "+err.Error()
		m.audit(e)
		return
	}
	m.audit(e)
	ctx, stop := context.WithCancel(context.WithoutCancel(r.Context()))
	defer stop()
	hostproto.Pipe(websocket.NetConn(ctx, ws, websocket.MessageBinary), conn)
}

// handleSignInLink gives the caller a code for a sign-in link: whoever
// opens the link gets a token of the caller's role for sessionTTL.
func (m *Manager) handleSignInLink(w http.ResponseWriter, r *http.Request) {
	code, err := m.passes.issue(signInScope, callerOf(r), linkTTL, time.Now())
	if err != nil {
		writeError(w, m.log, err)
		return
	}
	noteSuccess(r, http.StatusCreated)
	writeJSON(w, http.StatusCreated, api.SignInLink{Code: code, ExpiresInSeconds: int(linkTTL / time.Second)})
}

// handleSignIn exchanges a sign-in link's code for an API token (no token
// needed: the code is the credential; audited as the link's maker).
func (m *Manager) handleSignIn(w http.ResponseWriter, r *http.Request) {
	var req api.SignInRequest
	if err := decodeBody(r, &req); err != nil {
		writeError(w, m.log, err)
		return
	}
	c, err := m.passes.redeem(req.Code, signInScope, time.Now())
	if c.Kind != "" {
		*r = *r.WithContext(context.WithValue(r.Context(), callerKey{}, c)) // the audit names who made the link
	}
	if err == nil {
		err = m.stillValid(c)
	}
	if err != nil {
		writeError(w, m.log, err)
		return
	}
	t, err := m.sessionToken(r.Context(), c)
	if err != nil {
		writeError(w, m.log, err)
		return
	}
	noteSuccess(r, http.StatusCreated)
	writeJSON(w, http.StatusCreated, t)
}

// sessionToken makes a browser's token, of c's role, for sessionTTL; the
// expired ones of earlier sign-ins are deleted on the way.
func (m *Manager) sessionToken(ctx context.Context, c caller) (api.TokenCreated, error) {
	toks, err := m.tokenRecords(ctx)
	if err != nil {
		return api.TokenCreated{}, err
	}
	now := time.Now()
	for _, t := range toks {
		if strings.HasPrefix(t.Name, sessionPrefix) && !t.Expires.IsZero() && now.After(t.Expires) {
			if err := m.store.Delete(ctx, tokenKey(t.ID)); err != nil {
				m.log.Warn("delete an expired sign-in token", "token", t.Name, "err", err)
			}
		}
	}
	// Not beyond the token that made the link.
	ttl := sessionTTL
	if r, ok := m.tokens.get(c.TokenID); ok && !r.Expires.IsZero() && r.Expires.Sub(now) < ttl {
		ttl = r.Expires.Sub(now)
	}
	if ttl < time.Second {
		return api.TokenCreated{}, errorf(ErrUnauthorized, "the api token %s that made the link expires now", c.Name)
	}
	var b [3]byte
	rand.Read(b[:])
	base := c.Name
	if len(base) > 40 {
		base = base[:40]
	}
	name := strings.TrimSuffix(sessionPrefix+base, "-") + "-" + hex.EncodeToString(b[:])
	return m.CreateToken(ctx, api.TokenCreateRequest{Name: name, Role: c.Role, TTLSeconds: int64(ttl / time.Second)}, "sign-in link of "+c.String())
}

// sessionPrefix starts the names of the tokens sign-in links give.
const sessionPrefix = "ui-"

// handleUsage is the VM's usage history, from the host it runs on.
func (m *Manager) handleUsage(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	vm, err := m.Get(r.Context(), name)
	if err != nil {
		writeError(w, m.log, err)
		return
	}
	if vm.State != api.StateRunning && vm.State != api.StatePaused {
		writeJSON(w, http.StatusOK, api.UsageHistory{VM: name, Host: vm.Host, Samples: []api.UsageSample{}})
		return
	}
	h, err := hostproto.Usage.Call(r.Context(), m.hostNamed(vm.Host), hostproto.VMRef{VM: name})
	if err != nil {
		writeError(w, m.log, fmt.Errorf("usage of vm %s: %w", name, err))
		return
	}
	if h.Samples == nil {
		h.Samples = []api.UsageSample{}
	}
	writeJSON(w, http.StatusOK, h)
}

// hostsInUse is every host with what its VMs reserve there.
func (m *Manager) hostsInUse(ctx context.Context) ([]api.Host, error) {
	rs, stale, err := m.currentRecords(ctx)
	if err != nil {
		return nil, err
	}
	if stale {
		m.log.Warn("hosts listed with the reservations of the mirror: the store did not answer")
	}
	m.placeMu.Lock()
	cands := m.hosts.candidates(rs, m.moving)
	m.placeMu.Unlock()
	out := make([]api.Host, 0, len(cands))
	for _, c := range cands {
		h := c.host
		h.ReservedMemoryBytes, h.ReservedCPUs = c.usedMemory, c.usedCPUs
		out = append(out, h)
	}
	return out, nil
}
