// Package remotehost is the manager's side of a host agent that runs in
// another process or on another machine: the host operations over HTTP
// (hostproto.Client), and what the host reports in its heartbeats
// (capacity, the status of every VM), with when it was last heard from.
package remotehost

import (
	"context"
	"crypto/tls"
	"io"
	"net/http"
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
	name, addr string
	conn       *hostproto.Client

	mu       sync.Mutex
	info     api.Host
	statuses map[string]hostproto.VMStatus
	// heard is when this process last had news of the host, on its own
	// monotonic clock: a clock step cannot make a host look silent.
	heard time.Time
	// rev orders news: the store revision of the status last applied;
	// seenRev that of the last liveness record (a heartbeat stores its
	// liveness every time, its status only when it changed: see the
	// manager's storeHeartbeat).
	rev, seenRev int64
	// lastHeartbeat is the wall-clock time of that heartbeat, for display.
	lastHeartbeat time.Time
}

// New returns a remote host reached at addr (host:port) over TLS with
// tlsConf, which must pin the host's identity (the manager's is
// Identity.HostClientTLS) and present the manager's certificate.
func New(name, addr string, tlsConf *tls.Config) *Host {
	h := &Host{name: name, addr: addr, statuses: map[string]hostproto.VMStatus{}, heard: time.Now()}
	hc := &http.Client{Transport: &http.Transport{
		TLSClientConfig:     tlsConf,
		ForceAttemptHTTP2:   true,
		MaxIdleConnsPerHost: 8,
		IdleConnTimeout:     90 * time.Second,
		TLSHandshakeTimeout: 10 * time.Second,
	}}
	h.conn = hostproto.NewClient("https://"+addr, hc, nil)
	return h
}

// Addr is where the host agent listens.
func (h *Host) Addr() string { return h.addr }

// Name is the host's name.
func (h *Host) Name() string { return h.name }

// Heartbeat records a report of the host stored at revision rev of the
// store (0 when not stored, as in tests), seen now. Older news is ignored.
func (h *Host) Heartbeat(hb hostproto.Heartbeat, rev int64, wall time.Time) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if rev != 0 && rev <= h.rev {
		return
	}
	h.rev = max(h.rev, rev)
	h.info = hb.Info
	h.heard = time.Now()
	if wall.After(h.lastHeartbeat) {
		h.lastHeartbeat = wall
	}
	h.statuses = make(map[string]hostproto.VMStatus, len(hb.Statuses))
	for _, s := range hb.Statuses {
		h.statuses[s.Name] = s
	}
}

// Seen records a heartbeat that stored only the host's liveness (at
// revision rev, sent at wall time), not its report: the report last
// applied stands.
func (h *Host) Seen(rev int64, wall time.Time) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if rev != 0 && rev <= h.seenRev {
		return
	}
	h.seenRev = max(h.seenRev, rev)
	h.heard = time.Now()
	if wall.After(h.lastHeartbeat) {
		h.lastHeartbeat = wall
	}
}

// Heard records that the host was heard from now (e.g. it registered),
// without a report of its VMs.
func (h *Host) Heard() {
	h.mu.Lock()
	h.heard = time.Now()
	h.mu.Unlock()
}

// HeardAt is when this process last heard from the host (monotonic).
func (h *Host) HeardAt() time.Time {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.heard
}

// Info reports the host's capacity as last heard, and whether it is up.
func (h *Host) Info() api.Host {
	h.mu.Lock()
	defer h.mu.Unlock()
	info := h.info
	info.Name = h.name
	info.LastHeartbeat = h.lastHeartbeat.UTC()
	info.State = "up"
	if time.Since(h.heard) > DownAfter {
		info.State = "down"
	}
	info.VMs = len(h.statuses)
	return info
}

// Status answers from the last heartbeat (or the last call): list views
// of hundreds of VMs must not cost a network round trip each.
func (h *Host) Status(name string) (hostproto.VMStatus, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	st, ok := h.statuses[name]
	return st, ok
}

// Call runs a host operation. A call that touched a VM refreshes what is
// known of it, so the next view does not wait for a heartbeat.
func (h *Host) Call(ctx context.Context, op string, req, resp any) error {
	if err := h.conn.Call(ctx, op, req, resp); err != nil {
		return err
	}
	if n, ok := req.(interface{ VMName() string }); ok && op != hostproto.Status.Name {
		h.refresh(ctx, n.VMName())
	}
	return nil
}

func (h *Host) refresh(ctx context.Context, vm string) {
	st, err := hostproto.Status.Call(context.WithoutCancel(ctx), h.conn, hostproto.VMRef{VM: vm})
	h.mu.Lock()
	defer h.mu.Unlock()
	switch {
	case err == nil:
		h.statuses[vm] = st
	case hostproto.KindOf(err) == "unknown-vm":
		delete(h.statuses, vm)
	}
}

// Stream runs a stream operation (the console).
func (h *Host) Stream(ctx context.Context, op string, req any, w io.Writer) error {
	return h.conn.Stream(ctx, op, req, w)
}

// Tunnel opens a tunnel operation (a VM's VNC console).
func (h *Host) Tunnel(ctx context.Context, op string, req any) (io.ReadWriteCloser, error) {
	return h.conn.Tunnel(ctx, op, req)
}
