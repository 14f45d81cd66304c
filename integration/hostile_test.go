package integration

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/client"
	"github.com/vigil-project/vigil/internal/hostproto"
	"github.com/vigil-project/vigil/internal/pki"
)

// hostile is a host that joined with a valid token and then misbehaves:
// it speaks the host protocol by hand, with its own certificate.
type hostile struct {
	t    *testing.T
	name string
	url  string
	hc   *http.Client
	cert *x509.Certificate
}

func joinHostile(t *testing.T, m *devAgent, name string) *hostile {
	t.Helper()
	tok := strings.TrimSpace(m.mustVigil("host", "join-token", "-q"))
	parsed, err := pki.ParseJoinToken(tok)
	if err != nil {
		t.Fatal(err)
	}
	key, keyPEM, _ := pki.NewKey()
	csr, _ := pki.NewCSR(key, name)
	url := "https://" + m.addr
	pinned := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: pki.PinnedConfig(parsed.CAFingerprint, nil)}}
	var joined hostproto.Joined
	code, body := post(t, pinned, url+"/v1/hosts/join", hostproto.Join{Name: name, Token: tok, CSR: string(csr),
		Register: hostproto.Register{Addr: "127.0.0.1:9", FenceAfterMS: 5000}})
	if code != http.StatusOK || json.Unmarshal(body, &joined) != nil {
		t.Fatalf("join as %s: %d %s", name, code, body)
	}
	h := &pki.Holder{}
	if err := h.Set([]byte(joined.Cert), keyPEM, []byte(joined.CA)); err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM([]byte(joined.CA))
	return &hostile{t: t, name: name, url: url, cert: h.Leaf(),
		hc: &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: pki.ClientConfig(pool, h, "")}}}
}

func post(t *testing.T, hc *http.Client, url string, body any) (int, []byte) {
	t.Helper()
	b, _ := json.Marshal(body)
	resp, err := hc.Post(url, "application/json", bytes.NewReader(b))
	if err != nil {
		return 0, []byte(err.Error())
	}
	defer resp.Body.Close()
	var out bytes.Buffer
	out.ReadFrom(resp.Body)
	return resp.StatusCode, out.Bytes()
}

// audited waits for an audit entry by actor whose action and error
// contain the given strings.
func audited(t *testing.T, m *devAgent, actor, action, errPart string) {
	t.Helper()
	waitFor(t, fmt.Sprintf("audit entry %s %s %q", actor, action, errPart), 10*time.Second, func() bool {
		es, err := m.client().Audit(context.Background(), 500)
		if err != nil {
			return false
		}
		for _, e := range es {
			if e.Actor == actor && strings.Contains(e.Action, action) && strings.Contains(e.Error, errPart) && e.Status >= 400 {
				return true
			}
		}
		return false
	})
}

// TestHostileHost: a host that joined with a valid token tries to take
// another host's name, to heartbeat and renew as another host, to report
// another host's VM as crashed, and to call another host's API; a client
// tries without a token, with a viewer's token, with a revoked one, and
// against a server of another CA. Each is refused, and the host's
// attempts are audited.
func TestHostileHost(t *testing.T) {
	needIntegration(t)
	c := startPoolCluster(t, "h1")
	m := c.m
	var v api.VM
	json.Unmarshal([]byte(m.mustVigil("vm", "create", "victim", "--host", "h1", "--start", "--wait", "-o", "json")), &v)
	if v.Guest == nil {
		t.Fatalf("no guest: %+v", v)
	}
	evil := joinHostile(t, m, "evil")

	t.Run("take a name", func(t *testing.T) {
		tok := strings.TrimSpace(m.mustVigil("host", "join-token", "-q"))
		parsed, _ := pki.ParseJoinToken(tok)
		key, _, _ := pki.NewKey()
		csr, _ := pki.NewCSR(key, "h1")
		pinned := &http.Client{Transport: &http.Transport{TLSClientConfig: pki.PinnedConfig(parsed.CAFingerprint, nil)}}
		code, body := post(t, pinned, evil.url+"/v1/hosts/join", hostproto.Join{Name: "h1", Token: tok, CSR: string(csr),
			Register: hostproto.Register{Addr: "127.0.0.1:9", FenceAfterMS: 5000}})
		if code != http.StatusForbidden || !strings.Contains(string(body), "already registered") {
			t.Fatalf("joining as h1: %d %s", code, body)
		}
		audited(t, m, "host:h1", "/v1/hosts/join", "already registered")
		if hostList(t, m)["h1"].State != "up" {
			t.Fatal("h1 was disturbed")
		}
	})

	t.Run("act as another host", func(t *testing.T) {
		for _, path := range []string{"/v1/hosts/h1/heartbeat", "/v1/hosts/h1/certificate"} {
			if code, body := post(t, evil.hc, evil.url+path, map[string]any{}); code != http.StatusForbidden {
				t.Fatalf("%s with evil's certificate: %d %s", path, code, body)
			}
			audited(t, m, "host:evil", path, "only for itself")
		}
	})

	t.Run("report another host's vm", func(t *testing.T) {
		hb := hostproto.Heartbeat{Events: []hostproto.Event{{Time: time.Now(), Host: "h1", VM: "victim", Kind: hostproto.EventIncident,
			Incident: &hostproto.Incident{Kind: hostproto.IncidentPanic, DetectedAt: time.Now()}}}}
		if code, body := post(t, evil.hc, evil.url+"/v1/hosts/evil/heartbeat", hb); code != http.StatusNoContent {
			t.Fatalf("evil's heartbeat: %d %s", code, body)
		}
		audited(t, m, "host:evil", "event incident", "as host h1")
		time.Sleep(2 * time.Second)
		after := showVM(t, m, "victim")
		if after.Guest == nil || after.Guest.BootID != v.Guest.BootID {
			t.Fatalf("the victim was restarted: %+v", after.Guest)
		}
		if incs, _ := m.client().Incidents(context.Background(), "victim"); len(incs) != 0 {
			t.Fatalf("incidents recorded from a forged event: %+v", incs)
		}
	})

	t.Run("call another host's api", func(t *testing.T) {
		// h1 lets another host open only a checkpoint stream (of a VM whose
		// standby it keeps for that host): every operation is forbidden.
		addr := hostAddr(t, c, "h1")
		_, body := post(t, evil.hc, "https://"+addr+"/v1/host/ops/fault", hostproto.FaultRequest{VM: "victim", Kind: "kill"})
		if !strings.Contains(string(body), "forbidden") {
			t.Fatalf("evil calling h1's api: %s", body)
		}
		b, _ := json.Marshal(hostproto.CheckpointsRequest{VM: "victim"})
		req, _ := http.NewRequest(http.MethodPost, "https://"+addr+hostproto.TunnelPath(hostproto.CheckpointsOp), bytes.NewReader(b))
		req.Header.Set("Connection", "Upgrade")
		req.Header.Set("Upgrade", hostproto.TunnelProtocol)
		if resp, err := evil.hc.Do(req); err != nil {
			body = []byte(err.Error())
		} else {
			var out bytes.Buffer
			out.ReadFrom(resp.Body)
			resp.Body.Close()
			body = out.Bytes()
		}
		if !strings.Contains(string(body), "no standby of victim for host evil") {
			t.Fatalf("evil opening a checkpoint stream to h1: %s", body)
		}
		if showVM(t, m, "victim").Guest.BootID != v.Guest.BootID {
			t.Fatal("the victim was restarted")
		}
	})

	t.Run("clients", func(t *testing.T) {
		cfg, err := client.LoadConfig(m.configPath())
		if err != nil {
			t.Fatal(err)
		}
		viewer := strings.TrimSpace(m.mustVigil("token", "create", "peek", "--role", "viewer", "-q"))
		revoked := strings.TrimSpace(m.mustVigil("token", "create", "gone", "--role", "admin", "-q"))
		m.mustVigil("token", "revoke", "gone")
		caFile := filepath.Join(t.TempDir(), "ca.pem")
		os.WriteFile(caFile, []byte(cfg.CACert), 0o600)
		other, _, _ := pki.NewCA("other")
		otherFile := filepath.Join(t.TempDir(), "other.pem")
		os.WriteFile(otherFile, other.CertPEM, 0o600)
		for _, tt := range []struct {
			name, token, ca string
			args            []string
			want            string
		}{
			{"no token", "", caFile, []string{"vm", "list"}, "no api token"},
			{"viewer mutates", viewer, caFile, []string{"vm", "stop", "victim"}, "this needs operator"},
			{"revoked", revoked, caFile, []string{"vm", "list"}, "unknown or revoked"},
			{"server of another ca", viewer, otherFile, []string{"vm", "list"}, "certificate"},
		} {
			cmd := exec.Command(filepath.Join(binDir, "vigil"), tt.args...)
			cmd.Env = append(os.Environ(), "VIGIL_CONFIG=", "VIGIL_ADDR=https://"+m.addr, "VIGIL_TOKEN="+tt.token, "VIGIL_CACERT="+tt.ca)
			out, err := cmd.CombinedOutput()
			if err == nil || !strings.Contains(string(out), tt.want) {
				t.Fatalf("%s: %v %s; want an error with %q", tt.name, err, out, tt.want)
			}
		}
		// A viewer reads.
		cmd := exec.Command(filepath.Join(binDir, "vigil"), "vm", "list")
		cmd.Env = append(os.Environ(), "VIGIL_CONFIG=", "VIGIL_ADDR=https://"+m.addr, "VIGIL_TOKEN="+viewer, "VIGIL_CACERT="+caFile)
		if out, err := cmd.CombinedOutput(); err != nil || !strings.Contains(string(out), "victim") {
			t.Fatalf("viewer list: %v %s", err, out)
		}
	})
}

// hostAddr is where a host agent of the cluster listens (its log says).
func hostAddr(t *testing.T, c *poolCluster, name string) string {
	t.Helper()
	var addr string
	waitFor(t, "the host's address in its log", 10*time.Second, func() bool {
		for _, line := range strings.Split(c.hosts[name].log.String(), "\n") {
			if i := strings.Index(line, "listen="); i >= 0 {
				addr = strings.Fields(line[i+len("listen="):])[0]
				return true
			}
		}
		return false
	})
	return addr
}
