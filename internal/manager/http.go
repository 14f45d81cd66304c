package manager

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/vigil-project/vigil/api"
)

// maxBody bounds request bodies; every request we accept is tiny.
const maxBody = 1 << 20

// Handler serves the REST API under /v1/.
func (m *Manager) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/health", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]any{"status": "ok", "manager": m.name, "leader": m.leader.Load()})
	})
	mux.HandleFunc("POST /v1/vms", m.handleCreate)
	mux.HandleFunc("GET /v1/vms", m.handleList)
	mux.HandleFunc("GET /v1/vms/{name}", m.handleGet)
	mux.HandleFunc("DELETE /v1/vms/{name}", m.handleDelete)
	mux.HandleFunc("PUT /v1/vms/{name}/state", m.handleState)
	mux.HandleFunc("GET /v1/vms/{name}/console", m.handleConsole)
	mux.HandleFunc("POST /v1/vms/{name}/exec", m.handleExec)
	mux.HandleFunc("GET /v1/vms/{name}/incidents", m.handleIncidents)
	mux.HandleFunc("POST /v1/vms/{name}/fault", m.handleFault)
	mux.HandleFunc("PUT /v1/vms/{name}/policy", m.handlePolicy)
	mux.HandleFunc("POST /v1/vms/{name}/migrate", m.handleMigrate)
	mux.HandleFunc("GET /v1/vms/{name}/snapshots", m.handleSnapshotList)
	mux.HandleFunc("POST /v1/vms/{name}/snapshots", m.handleSnapshotCreate)
	mux.HandleFunc("POST /v1/vms/{name}/snapshots/{snap}/revert", m.handleSnapshotRevert)
	mux.HandleFunc("DELETE /v1/vms/{name}/snapshots/{snap}", m.handleSnapshotDelete)
	mux.HandleFunc("GET /v1/hosts", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, m.Hosts())
	})
	mux.HandleFunc("GET /v1/events", m.handleEvents)
	mux.HandleFunc("POST /v1/hosts/join-tokens", m.handleJoinToken)
	mux.HandleFunc("POST /v1/hosts/register", m.handleRegister)
	mux.HandleFunc("POST /v1/hosts/{name}/heartbeat", m.handleHeartbeat)
	mux.HandleFunc("POST /v1/hosts/{name}/drain", m.handleDrain)
	mux.HandleFunc("POST /v1/hosts/{name}/enable", m.handleEnable)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, m.log, errorf(ErrNotFound, "no such endpoint %s %s: see docs/architecture.md for the API", r.Method, r.URL.Path))
	})
	return mux
}

func (m *Manager) handleCreate(w http.ResponseWriter, r *http.Request) {
	var req api.VMCreateRequest
	if err := decodeBody(r, &req); err != nil {
		writeError(w, m.log, err)
		return
	}
	vm, err := m.Create(r.Context(), req)
	if err != nil {
		writeError(w, m.log, err)
		return
	}
	writeJSON(w, http.StatusCreated, vm)
}

func (m *Manager) handleList(w http.ResponseWriter, r *http.Request) {
	vms, err := m.List(r.Context())
	if err != nil {
		writeError(w, m.log, err)
		return
	}
	writeJSON(w, http.StatusOK, vms)
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
