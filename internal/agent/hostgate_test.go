package agent

import (
	"crypto/tls"
	"crypto/x509"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/vigil-project/vigil/internal/hostproto"
	"github.com/vigil-project/vigil/internal/pki"
)

// TestHostGate: managers call every host operation; another host of the
// cluster may only open the checkpoint stream, and the operation learns
// which host it is from its certificate.
func TestHostGate(t *testing.T) {
	ca, _, err := pki.NewCA("test")
	if err != nil {
		t.Fatal(err)
	}
	leaf := func(role, name string) *x509.Certificate {
		certPEM, _, err := ca.Issue(pki.Profile{Role: role, Name: name})
		if err != nil {
			t.Fatal(err)
		}
		c, err := pki.ParseCert(certPEM)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	manager, host := leaf(pki.RoleManager, "m1"), leaf(pki.RoleHost, "h1")
	checkpoints := hostproto.TunnelPath(hostproto.CheckpointsOp)
	tests := []struct {
		name, method, path string
		cert               *x509.Certificate
		wantPass           bool
		wantPeer           string
	}{
		{"a manager calls an operation", "POST", "/v1/host/ops/start", manager, true, ""},
		{"a manager opens a tunnel", "POST", hostproto.TunnelPath("vnc"), manager, true, ""},
		{"a host may not call an operation", "POST", "/v1/host/ops/start", host, false, ""},
		{"a host may not open another tunnel", "POST", hostproto.TunnelPath("vnc"), host, false, ""},
		{"a host opens the checkpoint stream, named", "POST", checkpoints, host, true, "h1"},
		{"only by POST", "GET", checkpoints, host, false, ""},
		{"no certificate", "POST", checkpoints, nil, false, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			passed, peer := false, "unset"
			h := hostGate(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				passed, peer = true, hostproto.PeerHost(r.Context())
			}))
			r := httptest.NewRequest(tt.method, tt.path, nil)
			r.TLS = &tls.ConnectionState{}
			if tt.cert != nil {
				r.TLS.VerifiedChains = [][]*x509.Certificate{{tt.cert}}
			}
			w := httptest.NewRecorder()
			h.ServeHTTP(w, r)
			if passed != tt.wantPass {
				t.Fatalf("passed = %v (status %d), want %v", passed, w.Code, tt.wantPass)
			}
			if !passed && w.Code != http.StatusForbidden {
				t.Fatalf("status %d, want 403", w.Code)
			}
			if passed && peer != tt.wantPeer {
				t.Fatalf("peer host %q, want %q", peer, tt.wantPeer)
			}
		})
	}
}
