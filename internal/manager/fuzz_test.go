package manager

import (
	"encoding/json"
	"errors"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/hostproto"
)

// FuzzDecodeBody feeds arbitrary bodies to the API's request decoder for
// every request type the API takes: it either decodes or fails as invalid,
// never panics, and what it decodes it can encode.
func FuzzDecodeBody(f *testing.F) {
	f.Add([]byte(`{"name":"web1","memory_bytes":134217728,"cpus":1,"disk_bytes":268435456,"start":true}`))
	f.Add([]byte(`{"action":"pause","to_disk":true}`))
	f.Add([]byte(`{"command":"df -h","timeout_seconds":5}`))
	f.Add([]byte(`{"name":"snap","no_memory":true}`))
	f.Add([]byte(`{"recovery":"none","hang_timeout_seconds":3}`))
	f.Add([]byte(`{"name":"h1","token":"t","addr":"127.0.0.1:1","fence_after_ms":5000}`))
	f.Add([]byte(`{"info":{},"statuses":[{"name":"a","running":true}],"events":[{"vm":"a","kind":"incident","incident":{"kind":"hang"}}]}`))
	f.Add([]byte(`{"info":{"name":"h1"},"same":7,"events":[]}`))
	f.Add([]byte(`{"info":{},"statuses":[{"name":"a"}],"report":18446744073709551615}`))
	f.Add([]byte(`{"a":1} {}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		targets := []any{&api.VMCreateRequest{}, &api.VMStateRequest{}, &api.ExecRequest{}, &api.SnapshotCreateRequest{},
			&api.RecoveryPolicy{}, &api.MigrateRequest{}, &api.FaultRequest{}, &hostproto.Register{}, &hostproto.Heartbeat{}}
		for _, v := range targets {
			r := httptest.NewRequest("POST", "/", strings.NewReader(string(body)))
			err := decodeBody(r, v)
			if err != nil && !errors.Is(err, ErrInvalid) {
				t.Fatalf("%T: error %v is not invalid", v, err)
			}
			if err != nil {
				continue
			}
			if _, err := json.Marshal(v); err != nil {
				t.Fatalf("%T: decoded but cannot encode: %v", v, err)
			}
		}
	})
}

// FuzzAPI sends arbitrary requests to the whole API of a manager with a
// fake host: every answer is a JSON error or a success, never a panic or a
// 500 for bad input.
func FuzzAPI(f *testing.F) {
	f.Add("POST", "/v1/vms", `{"name":"a","memory_bytes":134217728,"cpus":1,"disk_bytes":268435456}`)
	f.Add("PUT", "/v1/vms/a/state", `{"action":"start"}`)
	f.Add("POST", "/v1/vms/a/snapshots", `{"name":"s"}`)
	f.Add("POST", "/v1/vms/a/exec", `{"command":"ls"}`)
	f.Add("DELETE", "/v1/vms/a?force=true", ``)
	f.Add("GET", "/v1/vms/..%2f..", ``)
	m, _ := newTestManager(f)
	h := authed(f, m, RoleAdmin)
	f.Fuzz(func(t *testing.T, method, path, body string) {
		if !strings.HasPrefix(path, "/") || strings.ContainsAny(path, " \t\r\n") || method == "" || strings.ContainsAny(method, " \t\r\n/") {
			return
		}
		switch method {
		case "GET", "POST", "PUT", "DELETE":
		default:
			return
		}
		if strings.Contains(path, "follow") || strings.Contains(path, "console") || strings.Contains(path, "events") {
			return // streams run until the client goes
		}
		if _, err := url.ParseRequestURI(path); err != nil {
			return // not a request a client could send
		}
		req := httptest.NewRequest(method, "http://x"+path, strings.NewReader(body))
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		if w.Code >= 500 && w.Code != 503 {
			t.Fatalf("%s %s %q: %d %s", method, path, body, w.Code, w.Body.String())
		}
	})
}
