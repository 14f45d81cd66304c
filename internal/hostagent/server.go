package hostagent

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"sort"
	"strconv"
	"time"

	"github.com/vigil-project/vigil/internal/hostproto"
)

// Statuses reports every VM on this host.
func (a *Agent) Statuses() []hostproto.VMStatus {
	a.mu.Lock()
	vms := make([]*vm, 0, len(a.vms))
	for _, v := range a.vms {
		vms = append(vms, v)
	}
	a.mu.Unlock()
	out := make([]hostproto.VMStatus, 0, len(vms))
	for _, v := range vms {
		out = append(out, v.status())
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Handler serves the host API a remote manager calls: POST /v1/host/call
// and GET /v1/host/console/{vm}. Every request must carry the secret this
// host was given when it registered (secret returns "" until then, and
// then nothing is accepted).
func (a *Agent) Handler(secret func() string) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/host/call", func(w http.ResponseWriter, r *http.Request) {
		var c hostproto.Call
		if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20)).Decode(&c); err != nil {
			writeReply(w, http.StatusBadRequest, hostproto.Reply{Error: "malformed call: " + err.Error(), Code: hostproto.CodeOther})
			return
		}
		rep := a.Call(r.Context(), c)
		status := http.StatusOK
		if rep.Error != "" {
			status = http.StatusConflict
		}
		writeReply(w, status, rep)
	})
	mux.HandleFunc("GET /v1/host/console/{vm}", func(w http.ResponseWriter, r *http.Request) {
		follow, _ := strconv.ParseBool(r.URL.Query().Get("follow"))
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fw := flushWriter{w}
		if err := a.Console(r.Context(), r.PathValue("vm"), follow, fw); err != nil {
			http.Error(w, err.Error(), http.StatusConflict)
		}
	})
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		want := secret()
		got := r.Header.Get("Authorization")
		if want == "" || subtle.ConstantTimeCompare([]byte(got), []byte("Bearer "+want)) != 1 {
			http.Error(w, "not authorized: this host agent answers only the manager it joined", http.StatusUnauthorized)
			return
		}
		mux.ServeHTTP(w, r)
	})
}

type flushWriter struct{ w http.ResponseWriter }

func (f flushWriter) Write(p []byte) (int, error) {
	n, err := f.w.Write(p)
	if fl, ok := f.w.(http.Flusher); ok {
		fl.Flush()
	}
	return n, err
}

func writeReply(w http.ResponseWriter, status int, rep hostproto.Reply) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(rep)
}

// Call runs one manager request against this host.
func (a *Agent) Call(ctx context.Context, c hostproto.Call) hostproto.Reply {
	var rep hostproto.Reply
	var err error
	switch c.Op {
	case "info":
		info := a.Info()
		rep.Info = &info
	case "create":
		if c.Spec == nil {
			err = errors.New("create needs a spec")
			break
		}
		err = a.Create(ctx, *c.Spec)
	case "attach":
		if c.Spec == nil {
			err = errors.New("attach needs a spec")
			break
		}
		err = a.Attach(ctx, *c.Spec)
	case "migrate-in":
		if c.Spec == nil {
			err = errors.New("migrate-in needs a spec")
			break
		}
		rep.URI, err = a.MigrateIn(ctx, *c.Spec)
	case "migrate-out":
		var st hostproto.Migration
		if st, err = a.MigrateOut(ctx, c.VM, c.URI); err == nil {
			rep.Migration = &st
		}
	case "migrate-finish":
		err = a.MigrateFinish(ctx, c.VM)
	case "migrate-abort":
		err = a.MigrateAbort(ctx, c.VM)
	case "start":
		err = a.Start(ctx, c.VM)
	case "stop":
		err = a.Stop(ctx, c.VM, c.Force, time.Duration(c.TimeoutMS)*time.Millisecond)
	case "delete":
		err = a.Delete(ctx, c.VM)
	case "status":
		var st hostproto.VMStatus
		if st, err = a.Status(c.VM); err == nil {
			rep.Status = &st
		}
	case "pause":
		err = a.Pause(ctx, c.VM)
	case "resume":
		err = a.Resume(ctx, c.VM)
	case "suspend":
		var res hostproto.SaveResult
		if res, err = a.Suspend(ctx, c.VM); err == nil {
			rep.Save = &res
		}
	case "discard-state":
		err = a.DiscardState(c.VM)
	case "snapshot-create":
		var res hostproto.SaveResult
		if res, err = a.SnapshotCreate(ctx, c.VM, c.Snapshot, c.Memory); err == nil {
			rep.Save = &res
		}
	case "snapshot-revert":
		err = a.SnapshotRevert(ctx, c.VM, c.Snapshot, c.Memory)
	case "snapshot-delete":
		err = a.SnapshotDelete(ctx, c.VM, c.Snapshot)
	case "snapshot-space":
		rep.Space, err = a.SnapshotSpace(c.VM)
	case "exec":
		if c.Exec == nil {
			err = errors.New("exec needs a command")
			break
		}
		res, e := a.Exec(ctx, c.VM, *c.Exec)
		rep.Exec, err = &res, e
	case "restart":
		err = a.Restart(ctx, c.VM)
	case "set-health":
		err = a.SetHealth(c.VM, c.HangTimeoutSeconds, c.MinUptimeSeconds)
	case "fault":
		err = a.Fault(ctx, c.VM, c.Kind)
	default:
		err = fmt.Errorf("unknown host call %q", c.Op)
	}
	if err != nil {
		rep.Error, rep.Code = err.Error(), hostproto.CodeOther
		if errors.Is(err, hostproto.ErrBadState) {
			rep.Code = hostproto.CodeBadState
		}
	}
	return rep
}
