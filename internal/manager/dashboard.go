package manager

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"net/http"
	"sync"
	"time"

	"github.com/coder/websocket"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/hostproto"
)

// What the web dashboard needs beyond the REST API every client uses: a
// VM's usage history for its charts, and its VNC console as a WebSocket
// (what noVNC speaks). A browser cannot put a token on a WebSocket, so the
// page asks for a ticket with its token first (an audited call) and opens
// the socket with it: one use, for one VM, within ticketTTL. The ticket
// never grants more than the token that asked for it.

const (
	ticketTTL = 30 * time.Second
	// maxTickets bounds the tickets waiting to be used: a caller asking
	// for many cannot grow the manager's memory.
	maxTickets = 1024
)

// ticket is a one-use pass to one VM's console.
type ticket struct {
	vm      string
	caller  caller
	expires time.Time
}

// tickets are the console tickets given out and not yet used.
type tickets struct {
	mu sync.Mutex
	m  map[string]ticket
}

func newTickets() *tickets { return &tickets{m: map[string]ticket{}} }

// issue makes a ticket for c to open vm's console.
func (ts *tickets) issue(vm string, c caller, now time.Time) (string, error) {
	var b [24]byte
	rand.Read(b[:])
	id := base64.RawURLEncoding.EncodeToString(b[:])
	ts.mu.Lock()
	defer ts.mu.Unlock()
	for k, t := range ts.m {
		if now.After(t.expires) {
			delete(ts.m, k)
		}
	}
	if len(ts.m) >= maxTickets {
		return "", errorf(ErrUnavailable, "too many console tickets are waiting to be used: try again in %s", ticketTTL)
	}
	ts.m[id] = ticket{vm: vm, caller: c, expires: now.Add(ticketTTL)}
	return id, nil
}

// redeem uses up ticket id for vm and says whose it was.
func (ts *tickets) redeem(id, vm string, now time.Time) (caller, error) {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	t, ok := ts.m[id]
	delete(ts.m, id) // one try, right or wrong
	switch {
	case !ok:
		return caller{}, errorf(ErrUnauthorized, "no such console ticket (each is good once): ask for one with POST /v1/vms/%s/vnc/tickets", vm)
	case now.After(t.expires):
		return caller{}, errorf(ErrUnauthorized, "the console ticket expired (they last %s): ask for another", ticketTTL)
	case t.vm != vm:
		return caller{}, errorf(ErrForbidden, "the console ticket is for vm %s, not %s", t.vm, vm)
	}
	return t.caller, nil
}

// handleVNCTicket gives the caller a ticket for the VM's VNC WebSocket.
func (m *Manager) handleVNCTicket(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	if _, err := m.Get(r.Context(), name); err != nil {
		writeError(w, m.log, err)
		return
	}
	id, err := m.tickets.issue(name, callerOf(r), time.Now())
	if err != nil {
		writeError(w, m.log, err)
		return
	}
	writeJSON(w, http.StatusCreated, api.ConsoleTicket{Ticket: id, ExpiresInSeconds: int(ticketTTL / time.Second)})
}

// handleVNCWebSocket carries the VM's VNC console over a WebSocket (binary
// messages), for a caller holding a ticket. The browser's Origin must be
// this manager's (no other site may open it with the user's ticket).
func (m *Manager) handleVNCWebSocket(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	e := api.AuditEntry{Time: time.Now(), Action: r.Method + " " + r.URL.Path, VM: name,
		Status: http.StatusSwitchingProtocols, Remote: r.RemoteAddr}
	fail := func(err error) {
		e.Status, _ = statusOf(err)
		e.Error = err.Error()
		m.audit(e)
		writeError(w, m.log, err)
	}
	c, err := m.tickets.redeem(r.URL.Query().Get("ticket"), name, time.Now())
	e.Actor, e.Role = c.String(), c.Role
	if err != nil {
		fail(err)
		return
	}
	if !authorized(c.Role, RoleOperator) {
		fail(errorf(ErrForbidden, "token %s has role %s; the console needs %s", c.Name, c.Role, RoleOperator))
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
		e.Status, e.Error = http.StatusBadRequest, "websocket: "+err.Error()
		m.audit(e)
		return
	}
	m.audit(e)
	ctx, stop := context.WithCancel(context.WithoutCancel(r.Context()))
	defer stop()
	hostproto.Pipe(websocket.NetConn(ctx, ws, websocket.MessageBinary), conn)
}

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
	rs, err := m.records(ctx)
	if err != nil {
		return nil, err
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
