// Package remotehost is the manager's side of a host agent that runs in
// another process or on another machine: it implements the manager's Host
// interface with calls to the host's API, and keeps what the host reports
// in its heartbeats (capacity, the status of every VM).
package remotehost

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"sync"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/hostproto"
)

// DownAfter is how long without a heartbeat before a host shows as down:
// the manager stops acting on what it last said. Declaring it dead (and
// moving its VMs) is the manager's decision, later.
const DownAfter = 3 * time.Second

// Host is a remote host agent.
type Host struct {
	name, addr, secret string
	http               *http.Client

	mu       sync.Mutex
	info     api.Host
	statuses map[string]hostproto.VMStatus
	lastSeen time.Time
	deadAt   time.Time // declared dead; zero while alive
}

// SetDead records that the managers declared the host dead at t (zero: it
// joined again).
func (h *Host) SetDead(t time.Time) {
	h.mu.Lock()
	h.deadAt = t
	h.mu.Unlock()
}

// DeadAt is when the host was declared dead, or zero.
func (h *Host) DeadAt() time.Time {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.deadAt
}

// New returns a remote host reached at addr (host:port) with secret.
func New(name, addr, secret string) *Host {
	return &Host{name: name, addr: addr, secret: secret, http: &http.Client{}, statuses: map[string]hostproto.VMStatus{}}
}

// Secret is the secret the host authenticates with.
func (h *Host) Secret() string { return h.secret }

// Addr is where the host agent listens.
func (h *Host) Addr() string { return h.addr }

// Heartbeat records what the host reported now.
func (h *Host) Heartbeat(hb hostproto.Heartbeat) { h.HeartbeatAt(hb, time.Now()) }

// HeartbeatAt records what the host reported at seen (a heartbeat another
// manager received and shared through the store). Older news is ignored.
func (h *Host) HeartbeatAt(hb hostproto.Heartbeat, seen time.Time) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if seen.Before(h.lastSeen) {
		return
	}
	h.info = hb.Info
	h.lastSeen = seen
	h.statuses = make(map[string]hostproto.VMStatus, len(hb.Statuses))
	for _, s := range hb.Statuses {
		h.statuses[s.Name] = s
	}
}

// Seen records that the host was heard from at t (e.g. it registered),
// without a report of its VMs.
func (h *Host) Seen(t time.Time) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if t.After(h.lastSeen) {
		h.lastSeen = t
	}
}

// Name is the host's name.
func (h *Host) Name() string { return h.name }

// Info reports the host's capacity as last heard, and whether it is up.
func (h *Host) Info() api.Host {
	h.mu.Lock()
	defer h.mu.Unlock()
	info := h.info
	info.Name = h.name
	info.LastHeartbeat = h.lastSeen.UTC()
	info.State = "up"
	switch {
	case !h.deadAt.IsZero():
		info.State = "dead"
	case time.Since(h.lastSeen) > DownAfter:
		info.State = "down"
	}
	info.VMs = len(h.statuses)
	return info
}

// call sends one request to the host.
func (h *Host) call(ctx context.Context, c hostproto.Call) (hostproto.Reply, error) {
	var rep hostproto.Reply
	b, _ := json.Marshal(c)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+h.addr+"/v1/host/call", bytes.NewReader(b))
	if err != nil {
		return rep, err
	}
	req.Header.Set("Authorization", "Bearer "+h.secret)
	req.Header.Set("Content-Type", "application/json")
	resp, err := h.http.Do(req)
	if err != nil {
		return rep, fmt.Errorf("host %s (%s) does not answer: %w", h.name, h.addr, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusUnauthorized {
		return rep, fmt.Errorf("host %s refused the manager's secret: it may have re-registered elsewhere", h.name)
	}
	if err := json.NewDecoder(resp.Body).Decode(&rep); err != nil {
		return rep, fmt.Errorf("host %s: bad answer to %s: %w", h.name, c.Op, err)
	}
	if rep.Error != "" {
		if rep.Code == hostproto.CodeBadState {
			return rep, &remoteError{msg: rep.Error, sentinel: hostproto.ErrBadState}
		}
		return rep, errors.New(rep.Error)
	}
	// Refresh the cached status of the VM the call touched, so the next
	// view does not wait for a heartbeat.
	if c.VM != "" && c.Op != "status" && c.Op != "delete" {
		if st, err := h.call(ctx, hostproto.Call{Op: "status", VM: c.VM}); err == nil && st.Status != nil {
			h.mu.Lock()
			h.statuses[c.VM] = *st.Status
			h.mu.Unlock()
		}
	}
	if c.Op == "delete" {
		h.mu.Lock()
		delete(h.statuses, c.VM)
		h.mu.Unlock()
	}
	return rep, nil
}

// remoteError keeps the sentinel a host error wrapped.
type remoteError struct {
	msg      string
	sentinel error
}

func (e *remoteError) Error() string { return e.msg }
func (e *remoteError) Unwrap() error { return e.sentinel }

func (h *Host) simple(ctx context.Context, c hostproto.Call) error {
	_, err := h.call(ctx, c)
	return err
}

// Create makes the VM's directory and disk on the host.
func (h *Host) Create(ctx context.Context, spec hostproto.VMSpec) error {
	if err := h.simple(ctx, hostproto.Call{Op: "create", Spec: &spec}); err != nil {
		return err
	}
	h.mu.Lock()
	h.statuses[spec.Name] = hostproto.VMStatus{Name: spec.Name}
	h.mu.Unlock()
	return nil
}

func (h *Host) Start(ctx context.Context, name string) error {
	return h.simple(ctx, hostproto.Call{Op: "start", VM: name})
}

func (h *Host) Stop(ctx context.Context, name string, force bool, timeout time.Duration) error {
	return h.simple(ctx, hostproto.Call{Op: "stop", VM: name, Force: force, TimeoutMS: timeout.Milliseconds()})
}

func (h *Host) Delete(ctx context.Context, name string) error {
	return h.simple(ctx, hostproto.Call{Op: "delete", VM: name})
}

// Status answers from the last heartbeat (or the last call): list views
// of hundreds of VMs must not cost a network round trip each.
func (h *Host) Status(name string) (hostproto.VMStatus, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	st, ok := h.statuses[name]
	if !ok {
		return hostproto.VMStatus{}, fmt.Errorf("vm %s is not on host %s", name, h.name)
	}
	return st, nil
}

func (h *Host) Console(ctx context.Context, name string, follow bool, w io.Writer) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet,
		fmt.Sprintf("http://%s/v1/host/console/%s?follow=%t", h.addr, url.PathEscape(name), follow), nil)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+h.secret)
	resp, err := h.http.Do(req)
	if err != nil {
		return fmt.Errorf("host %s does not answer: %w", h.name, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return fmt.Errorf("console of %s: %s", name, bytes.TrimSpace(b))
	}
	_, err = io.Copy(w, resp.Body)
	if ctx.Err() != nil {
		return nil
	}
	return err
}

func (h *Host) Pause(ctx context.Context, name string) error {
	return h.simple(ctx, hostproto.Call{Op: "pause", VM: name})
}

func (h *Host) Resume(ctx context.Context, name string) error {
	return h.simple(ctx, hostproto.Call{Op: "resume", VM: name})
}

func (h *Host) Suspend(ctx context.Context, name string) (hostproto.SaveResult, error) {
	rep, err := h.call(ctx, hostproto.Call{Op: "suspend", VM: name})
	if err != nil || rep.Save == nil {
		return hostproto.SaveResult{}, err
	}
	return *rep.Save, nil
}

func (h *Host) DiscardState(name string) error {
	return h.simple(context.Background(), hostproto.Call{Op: "discard-state", VM: name})
}

func (h *Host) SnapshotCreate(ctx context.Context, name, snap string, memory bool) (hostproto.SaveResult, error) {
	rep, err := h.call(ctx, hostproto.Call{Op: "snapshot-create", VM: name, Snapshot: snap, Memory: memory})
	if err != nil || rep.Save == nil {
		return hostproto.SaveResult{}, err
	}
	return *rep.Save, nil
}

func (h *Host) SnapshotRevert(ctx context.Context, name, snap string, memory bool) error {
	return h.simple(ctx, hostproto.Call{Op: "snapshot-revert", VM: name, Snapshot: snap, Memory: memory})
}

func (h *Host) SnapshotDelete(ctx context.Context, name, snap string) error {
	return h.simple(ctx, hostproto.Call{Op: "snapshot-delete", VM: name, Snapshot: snap})
}

func (h *Host) SnapshotSpace(name string) (map[string]int64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rep, err := h.call(ctx, hostproto.Call{Op: "snapshot-space", VM: name})
	return rep.Space, err
}

func (h *Host) Exec(ctx context.Context, name string, req api.ExecRequest) (api.ExecResult, error) {
	rep, err := h.call(ctx, hostproto.Call{Op: "exec", VM: name, Exec: &req})
	if err != nil || rep.Exec == nil {
		return api.ExecResult{}, err
	}
	return *rep.Exec, nil
}

// MigrateIn prepares the host to receive a live migration of spec.
func (h *Host) MigrateIn(ctx context.Context, spec hostproto.VMSpec) (string, error) {
	rep, err := h.call(ctx, hostproto.Call{Op: "migrate-in", Spec: &spec})
	return rep.URI, err
}

// MigrateOut sends the VM to uri and ends the local copy.
func (h *Host) MigrateOut(ctx context.Context, name, uri string) (hostproto.Migration, error) {
	rep, err := h.call(ctx, hostproto.Call{Op: "migrate-out", VM: name, URI: uri})
	if err != nil || rep.Migration == nil {
		return hostproto.Migration{}, err
	}
	return *rep.Migration, nil
}

// MigrateFinish makes the migrated VM this host's.
func (h *Host) MigrateFinish(ctx context.Context, name string) error {
	return h.simple(ctx, hostproto.Call{Op: "migrate-finish", VM: name})
}

// MigrateAbort ends an incoming migration.
func (h *Host) MigrateAbort(ctx context.Context, name string) error {
	return h.simple(ctx, hostproto.Call{Op: "migrate-abort", VM: name})
}

// Attach takes over a VM from the storage pool.
func (h *Host) Attach(ctx context.Context, spec hostproto.VMSpec) error {
	if err := h.simple(ctx, hostproto.Call{Op: "attach", Spec: &spec}); err != nil {
		return err
	}
	h.mu.Lock()
	if _, ok := h.statuses[spec.Name]; !ok {
		h.statuses[spec.Name] = hostproto.VMStatus{Name: spec.Name}
	}
	h.mu.Unlock()
	return nil
}

func (h *Host) Restart(ctx context.Context, name string) error {
	return h.simple(ctx, hostproto.Call{Op: "restart", VM: name})
}

func (h *Host) SetHealth(name string, hang, minUptime int) error {
	return h.simple(context.Background(), hostproto.Call{Op: "set-health", VM: name, HangTimeoutSeconds: hang, MinUptimeSeconds: minUptime})
}

func (h *Host) Fault(ctx context.Context, name, kind string) error {
	return h.simple(ctx, hostproto.Call{Op: "fault", VM: name, Kind: kind})
}
