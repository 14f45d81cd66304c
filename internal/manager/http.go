package manager

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/pki"
	"github.com/vigil-project/vigil/internal/ui"
)

// maxBody bounds request bodies; every request we accept is tiny.
const maxBody = 1 << 20

// Handler serves the REST API under /v1/. Every route says who may call it
// (the role an API token needs, or a host's certificate) and whether it is
// audited; a request is authenticated before its body is read.
func (m *Manager) Handler() http.Handler {
	mux := http.NewServeMux()
	user := func(pattern, role string, audited bool, h http.HandlerFunc) {
		mux.Handle(pattern, m.metrics.instrument(pattern, m.userRoute(role, audited, h)))
	}
	// The whole cluster, in Prometheus' text format (see metrics.go).
	user("GET /metrics", RoleViewer, false, m.handleMetrics)
	mux.HandleFunc("GET /v1/health", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]any{"status": "ok", "manager": m.name, "leader": m.leader.Load()})
	})
	user("POST /v1/vms", RoleOperator, true, m.handleCreate)
	user("GET /v1/vms", RoleViewer, false, m.handleList)
	user("GET /v1/vms/{name}", RoleViewer, false, m.handleGet)
	user("DELETE /v1/vms/{name}", RoleOperator, true, m.handleDelete)
	user("PUT /v1/vms/{name}/state", RoleOperator, true, m.handleState)
	user("PATCH /v1/vms/{name}", RoleOperator, true, m.handleReconfigure)
	user("GET /v1/vms/{name}/console", RoleOperator, false, m.handleConsole)
	user("GET /v1/vms/{name}/screenshot", RoleOperator, false, m.handleScreenshot)
	// Audited by the handler when the tunnel opens, not when it ends.
	user("GET /v1/vms/{name}/vnc", RoleOperator, false, m.handleVNC)
	// The dashboard's console: a ticket (with a token), then a WebSocket
	// (with the ticket; audited when it opens).
	user("POST /v1/vms/{name}/vnc/tickets", RoleOperator, true, m.handleVNCTicket)
	mux.Handle("GET /v1/vms/{name}/vnc/websocket", m.metrics.instrument("GET /v1/vms/{name}/vnc/websocket", http.HandlerFunc(m.handleVNCWebSocket)))
	user("GET /v1/vms/{name}/usage", RoleViewer, false, m.handleUsage)
	// Sign-in links for the dashboard: a code (with a token), exchanged
	// once for a token of the browser's own (with the code).
	user("POST /v1/ui/links", RoleViewer, true, m.handleSignInLink)
	mux.Handle("POST /v1/ui/sessions", m.metrics.instrument("POST /v1/ui/sessions", m.auditRoute(m.handleSignIn)))
	user("POST /v1/vms/{name}/exec", RoleOperator, true, m.handleExec)
	user("GET /v1/vms/{name}/incidents", RoleViewer, false, m.handleIncidents)
	user("POST /v1/vms/{name}/fault", RoleOperator, true, m.handleFault)
	user("PUT /v1/vms/{name}/policy", RoleOperator, true, m.handlePolicy)
	user("POST /v1/vms/{name}/migrate", RoleOperator, true, m.handleMigrate)
	user("POST /v1/vms/{name}/protect", RoleOperator, true, m.handleProtect)
	user("POST /v1/vms/{name}/unprotect", RoleOperator, true, m.handleUnprotect)
	user("GET /v1/vms/{name}/snapshots", RoleViewer, false, m.handleSnapshotList)
	user("POST /v1/vms/{name}/snapshots", RoleOperator, true, m.handleSnapshotCreate)
	user("POST /v1/vms/{name}/snapshots/{snap}/revert", RoleOperator, true, m.handleSnapshotRevert)
	user("DELETE /v1/vms/{name}/snapshots/{snap}", RoleOperator, true, m.handleSnapshotDelete)
	user("GET /v1/hosts", RoleViewer, false, func(w http.ResponseWriter, r *http.Request) {
		hs, err := m.hostsInUse(r.Context())
		if err != nil {
			// What the hosts report needs no store: in an outage it is
			// what an operator needs most (without the reservations).
			m.log.Warn("hosts listed without their reservations", "err", err)
			hs = m.Hosts()
		}
		writeJSON(w, http.StatusOK, hs)
	})
	user("GET /v1/events", RoleViewer, false, m.handleEvents)
	user("GET /v1/audit", RoleViewer, false, m.handleAudit)
	user("POST /v1/hosts/join-tokens", RoleAdmin, true, m.handleJoinToken)
	user("POST /v1/hosts/{name}/drain", RoleOperator, true, m.handleDrain)
	user("POST /v1/hosts/{name}/enable", RoleOperator, true, m.handleEnable)
	user("PUT /v1/images/{name}", RoleOperator, true, m.handleImageImport)
	user("GET /v1/images", RoleViewer, false, m.handleImageList)
	user("DELETE /v1/images/{name}", RoleOperator, true, m.handleImageDelete)
	mux.Handle("GET /v1/images/blobs/{digest}", m.nodeRoute(m.handleBlob))
	user("POST /v1/networks", RoleOperator, true, m.handleNetworkCreate)
	user("GET /v1/networks", RoleViewer, false, m.handleNetworkList)
	user("GET /v1/networks/{name}", RoleViewer, false, m.handleNetworkGet)
	user("DELETE /v1/networks/{name}", RoleOperator, true, m.handleNetworkDelete)
	user("POST /v1/tokens", RoleAdmin, true, m.handleTokenCreate)
	user("GET /v1/tokens", RoleAdmin, false, m.handleTokenList)
	user("DELETE /v1/tokens/{name}", RoleAdmin, true, m.handleTokenRevoke)
	m.bootRoutes(user)
	// Hosts: a join token in the body for the first contact, then the
	// host's certificate, which names it.
	host := func(pattern string, h http.Handler) { mux.Handle(pattern, m.metrics.instrument(pattern, h)) }
	host("POST /v1/hosts/join", m.auditRoute(m.handleJoin))
	host("POST /v1/hosts/register", m.hostRoute(false, true, m.handleRegister))
	host("POST /v1/hosts/{name}/heartbeat", m.hostRoute(true, false, m.handleHeartbeat))
	// A heartbeat that says Same comes here: a manager of an older version
	// answers 404 instead of reading it as a host with no VMs.
	host("POST /v1/hosts/{name}/heartbeat/same", m.hostRoute(true, false, m.handleHeartbeat))
	host("POST /v1/hosts/{name}/certificate", m.hostRoute(true, true, m.handleRenew))
	// The dashboard's files (the page signs in with a token and calls the
	// API above); the bare address leads to it.
	if dash, err := ui.New(); err == nil {
		mux.Handle("GET "+ui.Prefix, dash)
		mux.Handle("GET /{$}", http.RedirectHandler(ui.Prefix, http.StatusFound))
	} else {
		m.log.Error("the dashboard is not served", "err", err)
	}
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, m.log, errorf(ErrNotFound, "no such endpoint %s %s: see docs/architecture.md for the API", r.Method, r.URL.Path))
	})
	return mux
}

type callerKey struct{}

// callerOf is who made the request (set by the route wrappers).
func callerOf(r *http.Request) caller {
	c, _ := r.Context().Value(callerKey{}).(caller)
	return c
}

// userRoute needs an API token of at least role.
func (m *Manager) userRoute(role string, audited bool, h http.HandlerFunc) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, err := m.authenticate(r.Context(), r.Header.Get("Authorization"))
		if err == nil && !authorized(c.Role, role) {
			err = errorf(ErrForbidden, "token %s has role %s; this needs %s", c.Name, c.Role, role)
		}
		r = r.WithContext(context.WithValue(r.Context(), callerKey{}, c))
		if !audited && err == nil {
			h(w, r)
			return
		}
		m.audited(w, r, func(w http.ResponseWriter, r *http.Request) {
			if err != nil {
				writeError(w, m.log, err)
				return
			}
			h(w, r)
		})
	})
}

// hostRoute needs a host's certificate (verified by TLS against the
// cluster CA); with named, the {name} in the path must be that host.
// Refusals are always audited; successes when audited is set.
func (m *Manager) hostRoute(named, audited bool, h http.HandlerFunc) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		role, name, ok := pki.Peer(r.TLS)
		var err error
		switch {
		case !ok:
			err = errorf(ErrUnauthorized, "this endpoint is for host agents: present the host's certificate (join with 'vigil agent --host --join-token ...')")
		case role != pki.RoleHost:
			err = errorf(ErrForbidden, "this endpoint is for host agents, not %s", role)
		case named && r.PathValue("name") != name:
			err = errorf(ErrForbidden, "host %s may act only for itself, not for host %s", name, r.PathValue("name"))
		}
		c := caller{Kind: "host", Name: name, Role: "host"}
		r = r.WithContext(context.WithValue(r.Context(), callerKey{}, c))
		if err == nil && !audited {
			h(w, r)
			return
		}
		m.audited(w, r, func(w http.ResponseWriter, r *http.Request) {
			if err != nil {
				writeError(w, m.log, err)
				return
			}
			h(w, r)
		})
	})
}

// nodeRoute needs a certificate of the cluster, a host's or a manager's
// (image blobs go to both).
func (m *Manager) nodeRoute(h http.HandlerFunc) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		role, name, ok := pki.Peer(r.TLS)
		if !ok || (role != pki.RoleHost && role != pki.RoleManager) {
			m.audited(w, r, func(w http.ResponseWriter, r *http.Request) {
				writeError(w, m.log, errorf(ErrUnauthorized, "this endpoint is for the cluster's hosts and managers"))
			})
			return
		}
		r = r.WithContext(context.WithValue(r.Context(), callerKey{}, caller{Kind: strings.TrimPrefix(role, "vigil-"), Name: name, Role: role}))
		h(w, r)
	})
}

// auditRoute audits a route that authenticates in its handler (joining).
func (m *Manager) auditRoute(h http.HandlerFunc) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { m.audited(w, r, h) })
}

type auditNoteKey struct{}

// auditNote follows a call being audited. A handler names in it the VM of
// a call whose path does not (a create). The operation the call makes on
// that VM writes the call's entry in the same transaction as its outcome
// (vmOp.write), so the change and its record land together; the entry is
// then only published when the call returns.
type auditNote struct {
	mu sync.Mutex
	vm string
	// ok is the status the call answers when it succeeds (200 unless the
	// handler says otherwise: noteSuccess).
	ok     int
	entry  func(status int, errMsg string) api.AuditEntry
	stored *api.AuditEntry // written with an operation's outcome
	done   bool            // the call returned: too late to store with it
}

func noteVM(r *http.Request, vm string) {
	if n, ok := r.Context().Value(auditNoteKey{}).(*auditNote); ok {
		n.mu.Lock()
		n.vm = vm
		n.mu.Unlock()
	}
}

// noteSuccess tells the audit the status the call answers when it
// succeeds, if not 200.
func noteSuccess(r *http.Request, status int) {
	if n, ok := r.Context().Value(auditNoteKey{}).(*auditNote); ok {
		n.mu.Lock()
		n.ok = status
		n.mu.Unlock()
	}
}

// auditFor returns the entry of the call ctx belongs to, if the call is
// audited, acts on vm, and has no entry stored yet; stored must be called
// once the entry is written.
func auditFor(ctx context.Context, vm string) (e api.AuditEntry, stored func(), ok bool) {
	n, _ := ctx.Value(auditNoteKey{}).(*auditNote)
	if n == nil {
		return api.AuditEntry{}, nil, false
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.done || n.stored != nil || n.vm != vm || vm == "" {
		return api.AuditEntry{}, nil, false
	}
	e = n.entry(n.ok, "")
	e.Time = e.Time.UTC()
	if e.VM != vm {
		return api.AuditEntry{}, nil, false // a host's call, not one on the vm
	}
	return e, func() {
		n.mu.Lock()
		n.stored = &e
		n.mu.Unlock()
	}, true
}

// audited runs h and records the call with its result.
func (m *Manager) audited(w http.ResponseWriter, r *http.Request, h http.HandlerFunc) {
	rec := &statusRecorder{ResponseWriter: w, status: http.StatusOK}
	note := &auditNote{vm: r.PathValue("name"), ok: http.StatusOK}
	note.entry = func(status int, errMsg string) api.AuditEntry {
		c := callerOf(r)
		e := api.AuditEntry{Time: time.Now(), Actor: c.String(), Role: c.Role, Action: r.Method + " " + r.URL.Path,
			VM: note.vm, Status: status, Error: errMsg, Remote: r.RemoteAddr}
		if strings.HasPrefix(r.URL.Path, "/v1/hosts/") {
			e.VM, e.Host = "", r.PathValue("name")
		}
		if strings.HasPrefix(r.URL.Path, "/v1/tokens/") {
			e.VM = ""
		}
		if c.Kind == "host" && e.Host == "" {
			e.Host = c.Name
		}
		return e
	}
	r = r.WithContext(context.WithValue(r.Context(), auditNoteKey{}, note))
	h(rec, r)
	note.mu.Lock()
	note.done = true
	stored := note.stored
	e := note.entry(rec.status, rec.err)
	note.mu.Unlock()
	if stored != nil && rec.status == stored.Status {
		m.publishAudit(*stored)
		return
	}
	if stored != nil {
		// The call answered otherwise after all (an operation that
		// recorded its outcome, then failed): the entry stored with the
		// outcome is replaced, so each call has one entry.
		e.Time = stored.Time
	}
	m.audit(e)
}

// statusRecorder remembers the status and error message of an answer.
type statusRecorder struct {
	http.ResponseWriter
	status int
	err    string
}

func (s *statusRecorder) WriteHeader(code int) {
	s.status = code
	s.ResponseWriter.WriteHeader(code)
}

func (s *statusRecorder) Write(b []byte) (int, error) {
	if s.status >= 400 && s.err == "" {
		var e api.Error
		if json.Unmarshal(b, &e) == nil {
			s.err = e.Error
		}
	}
	return s.ResponseWriter.Write(b)
}

func (s *statusRecorder) Flush() {
	if f, ok := s.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

func (m *Manager) handleAudit(w http.ResponseWriter, r *http.Request) {
	limit, _ := strconv.Atoi(r.URL.Query().Get("limit"))
	out, err := m.Audit(r.Context(), limit)
	if err != nil {
		writeError(w, m.log, err)
		return
	}
	writeJSON(w, http.StatusOK, out)
}

func (m *Manager) handleTokenCreate(w http.ResponseWriter, r *http.Request) {
	var req api.TokenCreateRequest
	if err := decodeBody(r, &req); err != nil {
		writeError(w, m.log, err)
		return
	}
	t, err := m.CreateToken(r.Context(), req, callerOf(r).String())
	if err != nil {
		writeError(w, m.log, err)
		return
	}
	writeJSON(w, http.StatusCreated, t)
}

func (m *Manager) handleTokenList(w http.ResponseWriter, r *http.Request) {
	out, err := m.Tokens(r.Context())
	if err != nil {
		writeError(w, m.log, err)
		return
	}
	writeJSON(w, http.StatusOK, out)
}

func (m *Manager) handleTokenRevoke(w http.ResponseWriter, r *http.Request) {
	if err := m.RevokeToken(r.Context(), r.PathValue("name")); err != nil {
		writeError(w, m.log, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (m *Manager) handleCreate(w http.ResponseWriter, r *http.Request) {
	var req api.VMCreateRequest
	if err := decodeBody(r, &req); err != nil {
		writeError(w, m.log, err)
		return
	}
	noteVM(r, req.Name)
	noteSuccess(r, http.StatusCreated)
	vm, err := m.Create(r.Context(), req)
	if err != nil {
		writeError(w, m.log, err)
		return
	}
	writeJSON(w, http.StatusCreated, vm)
}

func (m *Manager) handleGet(w http.ResponseWriter, r *http.Request) {
	vm, err := m.Get(r.Context(), r.PathValue("name"))
	if err != nil {
		writeError(w, m.log, err)
		return
	}
	writeJSON(w, http.StatusOK, vm)
}

func (m *Manager) handleDelete(w http.ResponseWriter, r *http.Request) {
	noteSuccess(r, http.StatusNoContent)
	if err := m.Delete(r.Context(), r.PathValue("name"), boolParam(r, "force")); err != nil {
		writeError(w, m.log, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (m *Manager) handleState(w http.ResponseWriter, r *http.Request) {
	var req api.VMStateRequest
	if err := decodeBody(r, &req); err != nil {
		writeError(w, m.log, err)
		return
	}
	vm, err := m.ChangeState(r.Context(), r.PathValue("name"), req)
	if err != nil {
		writeError(w, m.log, err)
		return
	}
	writeJSON(w, http.StatusOK, vm)
}

func (m *Manager) handleExec(w http.ResponseWriter, r *http.Request) {
	var req api.ExecRequest
	if err := decodeBody(r, &req); err != nil {
		writeError(w, m.log, err)
		return
	}
	res, err := m.Exec(r.Context(), r.PathValue("name"), req)
	if err != nil {
		writeError(w, m.log, err)
		return
	}
	writeJSON(w, http.StatusOK, res)
}

func (m *Manager) handleIncidents(w http.ResponseWriter, r *http.Request) {
	incs, err := m.Incidents(r.Context(), r.PathValue("name"))
	if err != nil {
		writeError(w, m.log, err)
		return
	}
	writeJSON(w, http.StatusOK, incs)
}

func (m *Manager) handleFault(w http.ResponseWriter, r *http.Request) {
	noteSuccess(r, http.StatusAccepted)
	var req api.FaultRequest
	if err := decodeBody(r, &req); err != nil {
		writeError(w, m.log, err)
		return
	}
	if err := m.Fault(r.Context(), r.PathValue("name"), req.Kind); err != nil {
		writeError(w, m.log, err)
		return
	}
	w.WriteHeader(http.StatusAccepted)
}

func (m *Manager) handlePolicy(w http.ResponseWriter, r *http.Request) {
	var req api.RecoveryPolicy
	if err := decodeBody(r, &req); err != nil {
		writeError(w, m.log, err)
		return
	}
	vm, err := m.SetPolicy(r.Context(), r.PathValue("name"), req)
	if err != nil {
		writeError(w, m.log, err)
		return
	}
	writeJSON(w, http.StatusOK, vm)
}

func (m *Manager) handleSnapshotList(w http.ResponseWriter, r *http.Request) {
	l, err := m.ListSnapshots(r.Context(), r.PathValue("name"))
	if err != nil {
		writeError(w, m.log, err)
		return
	}
	writeJSON(w, http.StatusOK, l)
}

func (m *Manager) handleSnapshotCreate(w http.ResponseWriter, r *http.Request) {
	var req api.SnapshotCreateRequest
	if err := decodeBody(r, &req); err != nil {
		writeError(w, m.log, err)
		return
	}
	noteSuccess(r, http.StatusCreated)
	s, err := m.CreateSnapshot(r.Context(), r.PathValue("name"), req)
	if err != nil {
		writeError(w, m.log, err)
		return
	}
	writeJSON(w, http.StatusCreated, s)
}

func (m *Manager) handleSnapshotRevert(w http.ResponseWriter, r *http.Request) {
	vm, err := m.RevertSnapshot(r.Context(), r.PathValue("name"), r.PathValue("snap"))
	if err != nil {
		writeError(w, m.log, err)
		return
	}
	writeJSON(w, http.StatusOK, vm)
}

func (m *Manager) handleSnapshotDelete(w http.ResponseWriter, r *http.Request) {
	noteSuccess(r, http.StatusNoContent)
	if err := m.DeleteSnapshot(r.Context(), r.PathValue("name"), r.PathValue("snap")); err != nil {
		writeError(w, m.log, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (m *Manager) handleConsole(w http.ResponseWriter, r *http.Request) {
	follow := boolParam(r, "follow")
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	fw := &flushWriter{w: w}
	if err := m.Console(r.Context(), r.PathValue("name"), follow, fw); err != nil && !fw.wrote {
		writeError(w, m.log, err)
	}
}

// handleEvents streams events as NDJSON (one JSON object a line), or as
// Server-Sent Events when the client accepts text/event-stream. Without
// ?follow it returns the remembered backlog and ends.
func (m *Manager) handleEvents(w http.ResponseWriter, r *http.Request) {
	since, _ := strconv.ParseUint(r.URL.Query().Get("since"), 10, 64)
	vmFilter := r.URL.Query().Get("vm")
	follow := boolParam(r, "follow")
	sse := strings.Contains(r.Header.Get("Accept"), "text/event-stream")

	backlog, ch, cancel := m.events.Subscribe(since)
	defer cancel()
	if sse {
		w.Header().Set("Content-Type", "text/event-stream")
	} else {
		w.Header().Set("Content-Type", "application/x-ndjson")
	}
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	fw := &flushWriter{w: w}
	enc := json.NewEncoder(fw)
	send := func(e api.Event) error {
		if vmFilter != "" && e.VM != vmFilter {
			return nil
		}
		if sse {
			b, _ := json.Marshal(e)
			_, err := fmt.Fprintf(fw, "id: %d\nevent: %s\ndata: %s\n\n", e.Seq, e.Type, b)
			return err
		}
		return enc.Encode(e)
	}
	for _, e := range backlog {
		if send(e) != nil {
			return
		}
	}
	fw.Flush()
	if !follow {
		return
	}
	// A heartbeat line keeps proxies from closing an idle stream and lets a
	// client notice a dead server.
	hb := time.NewTicker(15 * time.Second)
	defer hb.Stop()
	for {
		select {
		case <-r.Context().Done():
			return
		case e, ok := <-ch:
			if !ok {
				return // too slow: the client reconnects with ?since
			}
			if send(e) != nil {
				return
			}
		case <-hb.C:
			var err error
			if sse {
				_, err = io.WriteString(fw, ": heartbeat\n\n")
			} else {
				_, err = io.WriteString(fw, "{}\n")
			}
			if err != nil {
				return
			}
		}
	}
}

func boolParam(r *http.Request, name string) bool {
	v, err := strconv.ParseBool(r.URL.Query().Get(name))
	return err == nil && v
}

// decodeBody reads one JSON object, refusing unknown fields and trailing data,
// so a typo in a field name is an error rather than a silent default.
func decodeBody(r *http.Request, v any) error {
	dec := json.NewDecoder(http.MaxBytesReader(nil, r.Body, maxBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return wrapf(ErrInvalid, err, "malformed JSON body")
	}
	if dec.More() {
		return errorf(ErrInvalid, "malformed JSON body: more than one JSON value")
	}
	return nil
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

// writeError is the one place errors become HTTP answers.
func writeError(w http.ResponseWriter, log *slog.Logger, err error) {
	status, code := statusOf(err)
	if status >= 500 {
		log.Error("request failed", "err", err)
	}
	writeJSON(w, status, api.Error{Error: err.Error(), Code: code})
}

// flushWriter flushes after every write so streams reach the client as they happen.
type flushWriter struct {
	w     http.ResponseWriter
	wrote bool
}

func (f *flushWriter) Write(p []byte) (int, error) {
	f.wrote = true
	n, err := f.w.Write(p)
	f.Flush()
	return n, err
}

func (f *flushWriter) Flush() {
	if fl, ok := f.w.(http.Flusher); ok {
		fl.Flush()
	}
}
