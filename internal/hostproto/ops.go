package hostproto

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/vigil-project/vigil/api"
)

// Handler is what a host agent does for a manager. Each method is one host
// operation, declared next to it below with its wire name and its time
// limit; both the HTTP server (Serve) and the client side (Op.Call over a
// Conn) are driven from those declarations, so adding an operation means
// one method here, one declaration below, and its implementation in the
// host agent. TestEveryMethodIsDeclared keeps the two lists equal.
type Handler interface {
	Info(context.Context, None) (api.Host, error)
	Create(context.Context, CreateRequest) (CreateResult, error)
	Attach(context.Context, VMSpec) (None, error)
	Start(context.Context, VMRef) (None, error)
	Stop(context.Context, StopRequest) (None, error)
	Restart(context.Context, VMRef) (None, error)
	Delete(context.Context, VMRef) (None, error)
	Status(context.Context, VMRef) (VMStatus, error)
	Pause(context.Context, VMRef) (None, error)
	Resume(context.Context, VMRef) (None, error)
	Suspend(context.Context, VMRef) (SaveResult, error)
	DiscardState(context.Context, VMRef) (None, error)
	SnapshotCreate(context.Context, SnapshotRequest) (SaveResult, error)
	SnapshotRevert(context.Context, SnapshotRequest) (None, error)
	SnapshotDelete(context.Context, SnapshotRequest) (None, error)
	SnapshotSpace(context.Context, VMRef) (Space, error)
	Exec(context.Context, ExecRequest) (api.ExecResult, error)
	SetHealth(context.Context, HealthRequest) (None, error)
	Configure(context.Context, ConfigureRequest) (None, error)
	Screenshot(context.Context, VMRef) (ScreenshotResult, error)
	Fault(context.Context, FaultRequest) (None, error)
	MigrateIn(context.Context, MigrateInRequest) (MigrateInResult, error)
	MigrateOut(context.Context, MigrateOutRequest) (Migration, error)
	MigrateFinish(context.Context, VMRef) (None, error)
	MigrateAbort(context.Context, VMRef) (None, error)
	// SetNetworks gives the host the networks its VMs use as they stand
	// now (VXLAN peers change as hosts come and go).
	SetNetworks(context.Context, NetworksRequest) (None, error)
	// Console writes the VM's serial console to w; with Follow it goes on
	// until ctx ends.
	Console(context.Context, ConsoleRequest, io.Writer) error
	// VNC connects to the VM's VNC server (a unix socket on the host).
	VNC(context.Context, VMRef) (io.ReadWriteCloser, error)
	// Usage is what the VM used lately, as the host sampled it.
	Usage(context.Context, VMRef) (api.UsageHistory, error)

	// Protect makes this host, which runs the VM, send checkpoints of it
	// to its secondary; Unprotect stops that.
	Protect(context.Context, ProtectRequest) (None, error)
	Unprotect(context.Context, VMRef) (None, error)
	// Standby makes this host keep the VM's standby: it takes checkpoints
	// from the primary named; StandbyDrop forgets it.
	Standby(context.Context, StandbyRequest) (None, error)
	StandbyDrop(context.Context, VMRef) (None, error)
	// Activate runs the VM here from the standby's last committed
	// checkpoint (the VM must have been attached here first).
	Activate(context.Context, ActivateRequest) (ActivateResult, error)
	// Checkpoints is the stream of checkpoints from the primary host (the
	// only operation another host may call; see PeerHost).
	Checkpoints(context.Context, CheckpointsRequest) (io.ReadWriteCloser, error)
}

// The operations. The time limit applies when the caller's context has no
// deadline of its own; it bounds the call on both sides of the wire.
var (
	Info           = declare("info", Handler.Info, 10*time.Second)
	Create         = declare("create", Handler.Create, 2*time.Minute)
	Attach         = declare("attach", Handler.Attach, 30*time.Second)
	Start          = declare("start", Handler.Start, time.Minute)
	Stop           = declare("stop", Handler.Stop, 2*time.Minute)
	Restart        = declare("restart", Handler.Restart, time.Minute)
	Delete         = declare("delete", Handler.Delete, time.Minute)
	Status         = declare("status", Handler.Status, 10*time.Second)
	Pause          = declare("pause", Handler.Pause, 30*time.Second)
	Resume         = declare("resume", Handler.Resume, 5*time.Minute)
	Suspend        = declare("suspend", Handler.Suspend, 10*time.Minute)
	DiscardState   = declare("discard-state", Handler.DiscardState, 30*time.Second)
	SnapshotCreate = declare("snapshot-create", Handler.SnapshotCreate, 10*time.Minute)
	SnapshotRevert = declare("snapshot-revert", Handler.SnapshotRevert, 10*time.Minute)
	SnapshotDelete = declare("snapshot-delete", Handler.SnapshotDelete, 5*time.Minute)
	SnapshotSpace  = declare("snapshot-space", Handler.SnapshotSpace, 30*time.Second)
	Exec           = declare("exec", Handler.Exec, time.Hour+time.Minute)
	SetHealth      = declare("set-health", Handler.SetHealth, 10*time.Second)
	Configure      = declare("configure", Handler.Configure, time.Minute)
	Screenshot     = declare("screenshot", Handler.Screenshot, 30*time.Second)
	Fault          = declare("fault", Handler.Fault, 30*time.Second)
	MigrateIn      = declare("migrate-in", Handler.MigrateIn, time.Minute)
	MigrateOut     = declare("migrate-out", Handler.MigrateOut, 10*time.Minute)
	MigrateFinish  = declare("migrate-finish", Handler.MigrateFinish, time.Minute)
	MigrateAbort   = declare("migrate-abort", Handler.MigrateAbort, time.Minute)
	SetNetworks    = declare("set-networks", Handler.SetNetworks, 30*time.Second)
	Console        = declareStream("console", Handler.Console)
	VNC            = declareTunnel("vnc", Handler.VNC)
	Usage          = declare("usage", Handler.Usage, 10*time.Second)
	Protect        = declare("protect", Handler.Protect, 30*time.Second)
	Unprotect      = declare("unprotect", Handler.Unprotect, time.Minute)
	Standby        = declare("standby", Handler.Standby, 30*time.Second)
	StandbyDrop    = declare("standby-drop", Handler.StandbyDrop, 30*time.Second)
	Activate       = declare("activate", Handler.Activate, 2*time.Minute)
	Checkpoints    = declareTunnel(CheckpointsOp, Handler.Checkpoints)
)

// CheckpointsOp is the wire name of Checkpoints, the one operation a host
// may open on another host.
const CheckpointsOp = "checkpoints"

// peerKey carries the name of the host that called, when a host (not a
// manager) did.
type peerKey struct{}

// WithPeerHost marks ctx as a call from host name, authenticated by its
// certificate.
func WithPeerHost(ctx context.Context, name string) context.Context {
	return context.WithValue(ctx, peerKey{}, name)
}

// PeerHost is the host that made the call ctx belongs to ("" for a
// manager's call).
func PeerHost(ctx context.Context) string {
	s, _ := ctx.Value(peerKey{}).(string)
	return s
}

// None is the request or answer of an operation that has none.
type None struct{}

// CreateRequest makes a VM's directory and disk on a host. A Spec without
// a HostPort gets a port free on that host (not one of AvoidPorts, which
// other VMs of the cluster hold).
type CreateRequest struct {
	Spec       VMSpec `json:"spec"`
	AvoidPorts []int  `json:"avoid_ports,omitempty"`
}

// CreateResult tells the port the host forwards to the guest.
type CreateResult struct {
	HostPort int `json:"host_port"`
}

// VMRef names the VM an operation acts on.
type VMRef struct {
	VM string `json:"vm"`
}

// StopRequest asks for an ACPI power-down, killed after Timeout (or at once
// with Force).
type StopRequest struct {
	VM        string `json:"vm"`
	Force     bool   `json:"force,omitempty"`
	TimeoutMS int64  `json:"timeout_ms,omitempty"`
}

// Timeout is the grace period of a graceful stop.
func (r StopRequest) Timeout() time.Duration { return time.Duration(r.TimeoutMS) * time.Millisecond }

// SnapshotRequest names a snapshot of a VM; Memory says whether it holds
// (or, to create, should hold) the guest's memory.
type SnapshotRequest struct {
	VM       string `json:"vm"`
	Snapshot string `json:"snapshot"`
	Memory   bool   `json:"memory,omitempty"`
	// NoQuiesce: a disk-only snapshot without freezing the guest's file
	// systems, even if its agent could.
	NoQuiesce bool `json:"no_quiesce,omitempty"`
}

// Space is, per snapshot, the bytes only it holds.
type Space struct {
	Bytes map[string]int64 `json:"bytes"`
}

// ExecRequest runs a command in a VM's guest.
type ExecRequest struct {
	VM   string          `json:"vm"`
	Exec api.ExecRequest `json:"exec"`
}

// HealthRequest sets a VM's hang timeout and grace period (seconds; zero
// means the defaults).
type HealthRequest struct {
	VM                 string `json:"vm"`
	HangTimeoutSeconds int    `json:"hang_timeout_seconds,omitempty"`
	MinUptimeSeconds   int    `json:"min_uptime_seconds,omitempty"`
}

// FaultRequest injects a fault (panic, hang, agent-stop, kill) for a drill.
type FaultRequest struct {
	VM   string `json:"vm"`
	Kind string `json:"kind"`
}

// MigrateInRequest prepares a host to receive a live migration of Spec
// from host Source: only that host's certificate may send the stream.
type MigrateInRequest struct {
	Spec   VMSpec `json:"spec"`
	Source string `json:"source"`
}

// MigrateInResult tells which port an incoming live migration listens on
// (on the address the managers reach the host at).
type MigrateInResult struct {
	Port int `json:"port"`
}

// MigrateOutRequest sends a running VM to host Dest, listening at Addr
// (an IP address: the destination's registered one) and Port. The stream
// goes over TLS and Dest must present its certificate.
type MigrateOutRequest struct {
	VM   string `json:"vm"`
	Dest string `json:"dest"`
	Addr string `json:"addr"`
	Port int    `json:"port"`
}

// ConfigureRequest changes what a VM's next boot gets: a new cloud-init
// configuration (with a new instance id), or an empty CD-ROM drive
// (Eject, at once when the VM runs).
type ConfigureRequest struct {
	VM        string     `json:"vm"`
	CloudInit *CloudInit `json:"cloud_init,omitempty"`
	Eject     bool       `json:"eject,omitempty"`
}

// NetworksRequest lists networks a host's VMs use.
type NetworksRequest struct {
	Networks []NetworkSpec `json:"networks"`
}

// ScreenshotResult is a PNG of a VM's display.
type ScreenshotResult struct {
	PNG []byte `json:"png"`
}

// ConsoleRequest asks for a VM's serial console.
type ConsoleRequest struct {
	VM     string `json:"vm"`
	Follow bool   `json:"follow,omitempty"`
}

// VMName lets a transport see which VM a request touches (to refresh what
// it knows of that VM after the call).
func (r VMRef) VMName() string             { return r.VM }
func (r StopRequest) VMName() string       { return r.VM }
func (r SnapshotRequest) VMName() string   { return r.VM }
func (r ExecRequest) VMName() string       { return r.VM }
func (r HealthRequest) VMName() string     { return r.VM }
func (r FaultRequest) VMName() string      { return r.VM }
func (r MigrateOutRequest) VMName() string { return r.VM }
func (r ConsoleRequest) VMName() string    { return r.VM }
func (r ConfigureRequest) VMName() string  { return r.VM }
func (s VMSpec) VMName() string            { return s.Name }
func (r MigrateInRequest) VMName() string  { return r.Spec.Name }
func (r CreateRequest) VMName() string     { return r.Spec.Name }

// Conn carries operations to one host: in process (Local) or over HTTP
// (Client). Requests and answers are the declared types; resp is a pointer.
type Conn interface {
	Call(ctx context.Context, op string, req, resp any) error
	Stream(ctx context.Context, op string, req any, w io.Writer) error
	Tunnel(ctx context.Context, op string, req any) (io.ReadWriteCloser, error)
}

// Op is a declared host operation with request Req and answer Resp.
type Op[Req, Resp any] struct {
	Name    string
	Timeout time.Duration
}

// Call runs the operation on the host behind c.
func (o Op[Req, Resp]) Call(ctx context.Context, c Conn, req Req) (Resp, error) {
	var resp Resp
	ctx, cancel := withDefaultTimeout(ctx, o.Timeout)
	defer cancel()
	err := c.Call(ctx, o.Name, req, &resp)
	return resp, err
}

// StreamOp is a declared host operation whose answer is a byte stream.
type StreamOp[Req any] struct{ Name string }

// Stream runs the operation on the host behind c, copying its output to w.
func (o StreamOp[Req]) Stream(ctx context.Context, c Conn, req Req, w io.Writer) error {
	return c.Stream(ctx, o.Name, req, w)
}

func withDefaultTimeout(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok || d <= 0 {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, d)
}

// entry is an operation as the registry keeps it: typed functions behind
// untyped signatures, so one server and one local transport serve them all.
type entry struct {
	name    string
	timeout time.Duration
	stream  bool
	tunnel  bool
	reqType string
	// decode reads a request from JSON (unknown fields refused).
	decode func([]byte) (any, error)
	// serve runs the operation on h with a request decode (or a caller in
	// process) produced, and returns its answer.
	serve func(ctx context.Context, h Handler, req any) (any, error)
	// assign stores an answer serve returned into a caller's *Resp.
	assign func(dst, v any) error
	// serveStream runs a stream operation.
	serveStream func(ctx context.Context, h Handler, req any, w io.Writer) error
	// serveTunnel opens a tunnel.
	serveTunnel func(ctx context.Context, h Handler, req any) (io.ReadWriteCloser, error)
}

// The kinds of operation, each with its own path on the wire.
type opKind int

const (
	kindCall opKind = iota
	kindStream
	kindTunnel
)

func (e *entry) kind() opKind {
	switch {
	case e.stream:
		return kindStream
	case e.tunnel:
		return kindTunnel
	}
	return kindCall
}

var registry = map[string]*entry{}

func register(e *entry) {
	if _, dup := registry[e.name]; dup {
		panic("hostproto: operation " + e.name + " declared twice") // a programming error, caught by every test
	}
	registry[e.name] = e
}

func declare[Req, Resp any](name string, method func(Handler, context.Context, Req) (Resp, error), timeout time.Duration) Op[Req, Resp] {
	register(&entry{
		name: name, timeout: timeout, reqType: fmt.Sprintf("%T", *new(Req)),
		decode: func(b []byte) (any, error) {
			var req Req
			if err := decodeStrict(b, &req); err != nil {
				return nil, err
			}
			return req, nil
		},
		serve: func(ctx context.Context, h Handler, req any) (any, error) {
			r, ok := req.(Req)
			if !ok {
				return nil, fmt.Errorf("%w: %s takes %T, not %T", ErrInvalid, name, *new(Req), req)
			}
			return method(h, ctx, r)
		},
		assign: func(dst, v any) error {
			p, ok := dst.(*Resp)
			if !ok {
				return fmt.Errorf("%w: %s answers %T, not %T", ErrInvalid, name, new(Resp), dst)
			}
			*p = v.(Resp)
			return nil
		},
	})
	return Op[Req, Resp]{Name: name, Timeout: timeout}
}

func declareStream[Req any](name string, method func(Handler, context.Context, Req, io.Writer) error) StreamOp[Req] {
	register(&entry{
		name: name, stream: true, reqType: fmt.Sprintf("%T", *new(Req)),
		decode: func(b []byte) (any, error) {
			var req Req
			if err := decodeStrict(b, &req); err != nil {
				return nil, err
			}
			return req, nil
		},
		serveStream: func(ctx context.Context, h Handler, req any, w io.Writer) error {
			r, ok := req.(Req)
			if !ok {
				return fmt.Errorf("%w: %s takes %T, not %T", ErrInvalid, name, *new(Req), req)
			}
			return method(h, ctx, r, w)
		},
	})
	return StreamOp[Req]{Name: name}
}

// decodeStrict reads exactly one JSON value, refusing unknown fields: a
// manager and a host of different versions fail loudly, not silently.
func decodeStrict(b []byte, v any) error {
	dec := json.NewDecoder(bytesReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("%w: malformed request: %v", ErrInvalid, err)
	}
	if dec.More() {
		return fmt.Errorf("%w: malformed request: more than one JSON value", ErrInvalid)
	}
	return nil
}

// Ops lists the declared operation names (for tests and documentation).
func Ops() []string {
	out := make([]string, 0, len(registry))
	for n := range registry {
		out = append(out, n)
	}
	return out
}

// Local is a Conn to a host agent in this process: calls go straight to h,
// with the same operations, checks and time limits as over the wire, and
// the same behaviour when the caller goes away (the operation finishes).
func Local(h Handler) Conn { return local{h} }

type local struct{ h Handler }

func (l local) Call(ctx context.Context, op string, req, resp any) error {
	e, ok := registry[op]
	if !ok || e.kind() != kindCall {
		return fmt.Errorf("%w: unknown host operation %q", ErrInvalid, op)
	}
	timeout := e.timeout
	if d, ok := ctx.Deadline(); ok {
		timeout = time.Until(d)
	}
	hctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), timeout)
	defer cancel()
	out, err := e.serve(hctx, l.h, req)
	if err != nil && errors.Is(err, context.DeadlineExceeded) && hctx.Err() != nil {
		err = fmt.Errorf("%w after %s: %v", ErrTimeout, timeout, err)
	}
	if err != nil || resp == nil {
		return err
	}
	return e.assign(resp, out)
}

func (l local) Stream(ctx context.Context, op string, req any, w io.Writer) error {
	e, ok := registry[op]
	if !ok || e.kind() != kindStream {
		return fmt.Errorf("%w: unknown host stream %q", ErrInvalid, op)
	}
	return e.serveStream(ctx, l.h, req, w)
}
