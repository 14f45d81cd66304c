package hostproto

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode"

	"github.com/vigil-project/vigil/api"
)

// recorder is a Handler that records which method ran with what, and answers
// with values the test prepared.
type recorder struct {
	mu      sync.Mutex
	method  string
	req     any
	answers map[string]any // method -> answer
	err     error
	stream  string
}

func answer[T any](r *recorder, method string, req any) (T, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.method, r.req = method, req
	var zero T
	if r.err != nil {
		return zero, r.err
	}
	if a, ok := r.answers[method]; ok {
		return a.(T), nil
	}
	return zero, nil
}

func (r *recorder) Info(_ context.Context, q None) (api.Host, error) {
	return answer[api.Host](r, "Info", q)
}
func (r *recorder) Create(_ context.Context, q CreateRequest) (CreateResult, error) {
	return answer[CreateResult](r, "Create", q)
}
func (r *recorder) Attach(_ context.Context, q VMSpec) (None, error) {
	return answer[None](r, "Attach", q)
}
func (r *recorder) Start(_ context.Context, q VMRef) (None, error) {
	return answer[None](r, "Start", q)
}
func (r *recorder) Stop(_ context.Context, q StopRequest) (None, error) {
	return answer[None](r, "Stop", q)
}
func (r *recorder) Restart(_ context.Context, q VMRef) (None, error) {
	return answer[None](r, "Restart", q)
}
func (r *recorder) Delete(_ context.Context, q VMRef) (None, error) {
	return answer[None](r, "Delete", q)
}
func (r *recorder) Status(_ context.Context, q VMRef) (VMStatus, error) {
	return answer[VMStatus](r, "Status", q)
}
func (r *recorder) Pause(_ context.Context, q VMRef) (None, error) {
	return answer[None](r, "Pause", q)
}
func (r *recorder) Resume(_ context.Context, q VMRef) (None, error) {
	return answer[None](r, "Resume", q)
}
func (r *recorder) Suspend(_ context.Context, q VMRef) (SaveResult, error) {
	return answer[SaveResult](r, "Suspend", q)
}
func (r *recorder) DiscardState(_ context.Context, q VMRef) (None, error) {
	return answer[None](r, "DiscardState", q)
}
func (r *recorder) SnapshotCreate(_ context.Context, q SnapshotRequest) (SaveResult, error) {
	return answer[SaveResult](r, "SnapshotCreate", q)
}
func (r *recorder) SnapshotRevert(_ context.Context, q SnapshotRequest) (None, error) {
	return answer[None](r, "SnapshotRevert", q)
}
func (r *recorder) SnapshotDelete(_ context.Context, q SnapshotRequest) (None, error) {
	return answer[None](r, "SnapshotDelete", q)
}
func (r *recorder) SnapshotSpace(_ context.Context, q VMRef) (Space, error) {
	return answer[Space](r, "SnapshotSpace", q)
}
func (r *recorder) Exec(_ context.Context, q ExecRequest) (api.ExecResult, error) {
	return answer[api.ExecResult](r, "Exec", q)
}
func (r *recorder) SetHealth(_ context.Context, q HealthRequest) (None, error) {
	return answer[None](r, "SetHealth", q)
}
func (r *recorder) Fault(_ context.Context, q FaultRequest) (None, error) {
	return answer[None](r, "Fault", q)
}
func (r *recorder) MigrateIn(_ context.Context, q MigrateInRequest) (MigrateInResult, error) {
	return answer[MigrateInResult](r, "MigrateIn", q)
}
func (r *recorder) MigrateOut(_ context.Context, q MigrateOutRequest) (Migration, error) {
	return answer[Migration](r, "MigrateOut", q)
}
func (r *recorder) MigrateFinish(_ context.Context, q VMRef) (None, error) {
	return answer[None](r, "MigrateFinish", q)
}
func (r *recorder) MigrateAbort(_ context.Context, q VMRef) (None, error) {
	return answer[None](r, "MigrateAbort", q)
}
func (r *recorder) SetNetworks(_ context.Context, q NetworksRequest) (None, error) {
	return answer[None](r, "SetNetworks", q)
}
func (r *recorder) Console(_ context.Context, q ConsoleRequest, w io.Writer) error {
	if _, err := answer[None](r, "Console", q); err != nil {
		return err
	}
	_, err := io.WriteString(w, r.stream)
	return err
}

func (r *recorder) Configure(_ context.Context, q ConfigureRequest) (None, error) {
	return answer[None](r, "Configure", q)
}
func (r *recorder) Screenshot(_ context.Context, q VMRef) (ScreenshotResult, error) {
	return answer[ScreenshotResult](r, "Screenshot", q)
}

// VNC answers with an echo: what the caller writes comes back.
func (r *recorder) VNC(_ context.Context, q VMRef) (io.ReadWriteCloser, error) {
	if _, err := answer[None](r, "VNC", q); err != nil {
		return nil, err
	}
	a, b := net.Pipe()
	go func() { io.Copy(b, b); b.Close() }()
	return a, nil
}

func (r *recorder) Usage(_ context.Context, q VMRef) (api.UsageHistory, error) {
	return answer[api.UsageHistory](r, "Usage", q)
}

func (r *recorder) Protect(_ context.Context, q ProtectRequest) (None, error) {
	return answer[None](r, "Protect", q)
}
func (r *recorder) Unprotect(_ context.Context, q VMRef) (None, error) {
	return answer[None](r, "Unprotect", q)
}
func (r *recorder) Standby(_ context.Context, q StandbyRequest) (None, error) {
	return answer[None](r, "Standby", q)
}
func (r *recorder) StandbyDrop(_ context.Context, q VMRef) (None, error) {
	return answer[None](r, "StandbyDrop", q)
}
func (r *recorder) Activate(_ context.Context, q ActivateRequest) (ActivateResult, error) {
	return answer[ActivateResult](r, "Activate", q)
}

// Checkpoints answers with an echo, like VNC.
func (r *recorder) Checkpoints(_ context.Context, q CheckpointsRequest) (io.ReadWriteCloser, error) {
	if _, err := answer[None](r, "Checkpoints", q); err != nil {
		return nil, err
	}
	a, b := net.Pipe()
	go func() { io.Copy(b, b); b.Close() }()
	return a, nil
}

var _ Handler = (*recorder)(nil)

// kebab turns a method name into its wire name: SnapshotCreate →
// snapshot-create, VNC → vnc.
func kebab(s string) string {
	var b strings.Builder
	prev := rune(0)
	for _, r := range s {
		if unicode.IsUpper(r) {
			if unicode.IsLower(prev) {
				b.WriteByte('-')
			}
			prev, r = r, unicode.ToLower(r)
		} else {
			prev = r
		}
		b.WriteRune(r)
	}
	return b.String()
}

// TestEveryMethodIsDeclared holds the Handler interface and the declared
// operations together: each method has exactly one operation, named after
// it, taking its request type.
func TestEveryMethodIsDeclared(t *testing.T) {
	ht := reflect.TypeFor[Handler]()
	var methods []string
	for i := range ht.NumMethod() {
		m := ht.Method(i)
		name := kebab(m.Name)
		methods = append(methods, name)
		e, ok := registry[name]
		if !ok {
			t.Errorf("Handler.%s has no declared operation %q", m.Name, name)
			continue
		}
		if got, want := e.reqType, m.Type.In(1).String(); got != want {
			t.Errorf("operation %q takes %s, Handler.%s takes %s", name, got, m.Name, want)
		}
		if e.stream != (m.Type.NumIn() == 3) {
			t.Errorf("operation %q: stream %v, but Handler.%s has %d arguments", name, e.stream, m.Name, m.Type.NumIn())
		}
		if isTunnel := m.Type.Out(0) == reflect.TypeFor[io.ReadWriteCloser](); e.tunnel != isTunnel {
			t.Errorf("operation %q: tunnel %v, but Handler.%s answers %s", name, e.tunnel, m.Name, m.Type.Out(0))
		}
	}
	for _, name := range Ops() {
		if !slices.Contains(methods, name) {
			t.Errorf("operation %q is declared but Handler has no method for it", name)
		}
	}
}

// fill gives every field of v a distinct, JSON-stable value, so a field the
// wire drops or renames shows up as a difference.
func fill(v reflect.Value, n *int) {
	*n++
	switch v.Kind() {
	case reflect.String:
		v.SetString(fmt.Sprintf("s%d", *n))
	case reflect.Bool:
		v.SetBool(true)
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		v.SetInt(int64(*n))
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		v.SetUint(uint64(*n))
	case reflect.Float32, reflect.Float64:
		v.SetFloat(float64(*n) + 0.5)
	case reflect.Struct:
		if v.Type() == reflect.TypeFor[time.Time]() {
			v.Set(reflect.ValueOf(time.Date(2026, 1, 2, 3, 4, 5, *n, time.UTC)))
			return
		}
		for i := range v.NumField() {
			if v.Type().Field(i).IsExported() {
				fill(v.Field(i), n)
			}
		}
	case reflect.Pointer:
		p := reflect.New(v.Type().Elem())
		fill(p.Elem(), n)
		v.Set(p)
	case reflect.Slice:
		s := reflect.MakeSlice(v.Type(), 1, 1)
		fill(s.Index(0), n)
		v.Set(s)
	case reflect.Map:
		m := reflect.MakeMap(v.Type())
		k, e := reflect.New(v.Type().Key()).Elem(), reflect.New(v.Type().Elem()).Elem()
		fill(k, n)
		fill(e, n)
		m.SetMapIndex(k, e)
		v.Set(m)
	}
}

func filled(t reflect.Type) reflect.Value {
	v := reflect.New(t).Elem()
	n := 0
	fill(v, &n)
	return v
}

// TestEveryOpRoundTrips calls every declared operation over HTTP and in
// process and checks that the host's method named after it ran with the
// request sent, and that the caller got the answer the method gave.
func TestEveryOpRoundTrips(t *testing.T) {
	rec := &recorder{answers: map[string]any{}, stream: "console line\n"}
	srv := httptest.NewServer(Serve(rec, nil))
	defer srv.Close()
	conns := map[string]Conn{"http": NewClient(srv.URL, srv.Client(), nil), "local": Local(rec)}
	ht := reflect.TypeFor[Handler]()
	for i := range ht.NumMethod() {
		m := ht.Method(i)
		name := kebab(m.Name)
		req := filled(m.Type.In(1))
		for cname, c := range conns {
			t.Run(name+"/"+cname, func(t *testing.T) {
				var got reflect.Value
				var err error
				if m.Type.NumOut() == 2 && m.Type.Out(0) == reflect.TypeFor[io.ReadWriteCloser]() {
					var conn io.ReadWriteCloser
					conn, err = c.Tunnel(context.Background(), name, req.Interface())
					if err == nil {
						echoed := make([]byte, 4)
						if _, werr := conn.Write([]byte("ping")); werr != nil {
							t.Fatalf("write to the tunnel: %v", werr)
						}
						if _, rerr := io.ReadFull(conn, echoed); rerr != nil || string(echoed) != "ping" {
							t.Fatalf("tunnel echoed %q, %v; want \"ping\"", echoed, rerr)
						}
						conn.Close()
					}
				} else if m.Type.NumIn() == 3 {
					var sb strings.Builder
					err = c.Stream(context.Background(), name, req.Interface(), &sb)
					got = reflect.ValueOf(sb.String())
					if sb.String() != rec.stream {
						t.Fatalf("stream %q, want %q", sb.String(), rec.stream)
					}
				} else {
					want := filled(m.Type.Out(0))
					rec.mu.Lock()
					rec.answers[m.Name] = want.Interface()
					rec.mu.Unlock()
					resp := reflect.New(m.Type.Out(0))
					err = c.Call(context.Background(), name, req.Interface(), resp.Interface())
					got = resp.Elem()
					if err == nil && !reflect.DeepEqual(got.Interface(), want.Interface()) {
						t.Fatalf("answer %+v, want %+v", got.Interface(), want.Interface())
					}
				}
				if err != nil {
					t.Fatalf("call: %v", err)
				}
				rec.mu.Lock()
				defer rec.mu.Unlock()
				if rec.method != m.Name {
					t.Fatalf("operation %q ran Handler.%s, want Handler.%s", name, rec.method, m.Name)
				}
				if !reflect.DeepEqual(rec.req, req.Interface()) {
					t.Fatalf("host got %+v, caller sent %+v", rec.req, req.Interface())
				}
			})
		}
	}
}

// TestErrorsKeepTheirKind sends every kind of error back over the wire.
func TestErrorsKeepTheirKind(t *testing.T) {
	rec := &recorder{answers: map[string]any{}}
	srv := httptest.NewServer(Serve(rec, nil))
	defer srv.Close()
	conns := map[string]Conn{"http": NewClient(srv.URL, srv.Client(), nil), "local": Local(rec)}
	for _, k := range kinds {
		for cname, c := range conns {
			t.Run(k.name+"/"+cname, func(t *testing.T) {
				rec.mu.Lock()
				rec.err = fmt.Errorf("start web1: %w", k.err)
				rec.mu.Unlock()
				_, err := Start.Call(context.Background(), c, VMRef{VM: "web1"})
				if !errors.Is(err, k.err) || !strings.Contains(err.Error(), "start web1") {
					t.Fatalf("error %v, want one of kind %s with the host's message", err, k.name)
				}
				if KindOf(err) != k.name {
					t.Fatalf("kind %s, want %s", KindOf(err), k.name)
				}
			})
		}
	}
	rec.err = errors.New("something unnamed")
	_, err := Start.Call(context.Background(), conns["http"], VMRef{VM: "web1"})
	if err == nil || KindOf(err) != "internal" || err.Error() != "something unnamed" {
		t.Fatalf("internal error crossed as %v (%s)", err, KindOf(err))
	}
}

// TestServerRefusesBadRequests: unknown operations, unknown fields and
// trailing data are refused as invalid, not guessed at.
func TestServerRefusesBadRequests(t *testing.T) {
	rec := &recorder{answers: map[string]any{}}
	srv := httptest.NewServer(Serve(rec, nil))
	defer srv.Close()
	for _, tt := range []struct {
		path, body string
		want       int
	}{
		{"/v1/host/ops/frobnicate", `{}`, http.StatusBadRequest},
		{"/v1/host/ops/start", `{"vm":"a","vmm":"b"}`, http.StatusBadRequest},
		{"/v1/host/ops/start", `{"vm":"a"} {}`, http.StatusBadRequest},
		{"/v1/host/ops/start", `{"vm":`, http.StatusBadRequest},
		{"/v1/host/ops/console", `{"vm":"a"}`, http.StatusBadRequest}, // a stream is not an op
		{"/v1/host/streams/start", `{"vm":"a"}`, http.StatusBadRequest},
		{"/v1/host/call", `{}`, http.StatusBadRequest},
	} {
		resp, err := srv.Client().Post(srv.URL+tt.path, "application/json", strings.NewReader(tt.body))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != tt.want {
			t.Errorf("POST %s %s: %d, want %d", tt.path, tt.body, resp.StatusCode, tt.want)
		}
	}
}

// TestDeadlineCrossesTheWire: the host stops where the caller stops
// waiting, and the caller's op timeout applies when it gave none.
func TestDeadlineCrossesTheWire(t *testing.T) {
	seen := make(chan time.Duration, 1)
	h := &deadlineHandler{recorder: &recorder{answers: map[string]any{}}, seen: seen}
	srv := httptest.NewServer(Serve(h, nil))
	defer srv.Close()
	c := NewClient(srv.URL, srv.Client(), nil)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if _, err := Pause.Call(ctx, c, VMRef{VM: "a"}); err != nil {
		t.Fatal(err)
	}
	if d := <-seen; d > 3*time.Second || d < 2*time.Second {
		t.Fatalf("host saw %s left, want about 3s", d)
	}
	if _, err := Pause.Call(context.Background(), c, VMRef{VM: "a"}); err != nil {
		t.Fatal(err)
	}
	if d := <-seen; d > Pause.Timeout || d < Pause.Timeout-2*time.Second {
		t.Fatalf("host saw %s left, want about %s (the op's limit)", d, Pause.Timeout)
	}
}

type deadlineHandler struct {
	*recorder
	seen chan time.Duration
}

func (h *deadlineHandler) Pause(ctx context.Context, q VMRef) (None, error) {
	d, _ := ctx.Deadline()
	h.seen <- time.Until(d)
	return None{}, nil
}

// FuzzServeRequest feeds arbitrary operation names and bodies to the host
// server: it must answer every one with a status from the kinds table (or
// 200) and never panic.
func FuzzServeRequest(f *testing.F) {
	f.Add("start", []byte(`{"vm":"a"}`))
	f.Add("create", []byte(`{"name":"a","uuid":"u","memory_bytes":1,"cpus":1,"disk_bytes":1,"host_port":1}`))
	f.Add("stop", []byte(`{"vm":"a","force":true,"timeout_ms":-5}`))
	f.Add("exec", []byte(`{"vm":"a","exec":{"command":"ls"}}`))
	f.Add("console", []byte(`{"vm":"a","follow":false}`))
	f.Add("nope", []byte(`[]`))
	rec := &recorder{answers: map[string]any{}}
	h := Serve(rec, nil)
	f.Fuzz(func(t *testing.T, op string, body []byte) {
		for _, base := range []string{opsPath, streamsPath, tunnelsPath} {
			req := httptest.NewRequest(http.MethodPost, "http://h"+base+"x", strings.NewReader(string(body)))
			req.URL.Path = base + op
			req.SetPathValue("op", op)
			w := httptest.NewRecorder()
			h.ServeHTTP(w, req)
			if w.Code != http.StatusOK && statusOfKindCode(w.Code) == "" {
				t.Fatalf("status %d for op %q body %q", w.Code, op, body)
			}
		}
	})
}

func statusOfKindCode(code int) string {
	for _, k := range kinds {
		if k.status == code {
			return k.name
		}
	}
	if code == http.StatusInternalServerError || code == http.StatusMethodNotAllowed || code == http.StatusMovedPermanently || code == http.StatusTemporaryRedirect || code == http.StatusNotFound {
		return "other"
	}
	return ""
}

// FuzzDecodeRequest decodes arbitrary bytes as every operation's request:
// a decoded request encodes and decodes to itself.
func FuzzDecodeRequest(f *testing.F) {
	f.Add([]byte(`{"vm":"a"}`))
	f.Add([]byte(`{"name":"a","memory_bytes":134217728,"pool":"p","epoch":3}`))
	f.Add([]byte(`{"vm":"a","snapshot":"s","memory":true}`))
	f.Add([]byte(`{"vm":"a","exec":{"command":"ls","timeout_seconds":5}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		for name, e := range registry {
			req, err := e.decode(data)
			if err != nil {
				if !errors.Is(err, ErrInvalid) {
					t.Fatalf("%s: decode error %v is not ErrInvalid", name, err)
				}
				continue
			}
			if _, err := e.decode(mustJSON(t, req)); err != nil {
				t.Fatalf("%s: re-decode of %+v: %v", name, req, err)
			}
		}
	})
}

func mustJSON(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestTunnelRefusals: a tunnel needs the upgrade headers, and a host's
// refusal reaches the caller with its kind before any byte is tunnelled.
func TestTunnelRefusals(t *testing.T) {
	rec := &recorder{answers: map[string]any{}}
	srv := httptest.NewServer(Serve(rec, nil))
	defer srv.Close()
	resp, err := srv.Client().Post(srv.URL+tunnelsPath+"vnc", "application/json", strings.NewReader(`{"vm":"a"}`))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("a tunnel without Upgrade answered %s, want 400", resp.Status)
	}
	rec.err = fmt.Errorf("vnc of a: %w", ErrUnknownVM)
	for cname, c := range map[string]Conn{"http": NewClient(srv.URL, srv.Client(), nil), "local": Local(rec)} {
		if _, err := VNC.Open(context.Background(), c, VMRef{VM: "a"}); !errors.Is(err, ErrUnknownVM) {
			t.Fatalf("%s: tunnel to an unknown vm: %v, want ErrUnknownVM", cname, err)
		}
		if _, err := c.Tunnel(context.Background(), "start", VMRef{VM: "a"}); KindOf(err) != "invalid" {
			t.Fatalf("%s: start as a tunnel: %v, want an invalid request", cname, err)
		}
	}
}
