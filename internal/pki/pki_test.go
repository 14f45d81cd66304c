package pki

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

func mustCA(t testing.TB) *CA {
	t.Helper()
	ca, _, err := NewCA("test")
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

func holder(t testing.TB, ca *CA, p Profile) *Holder {
	t.Helper()
	cert, key, err := ca.Issue(p)
	if err != nil {
		t.Fatal(err)
	}
	h := &Holder{}
	if err := h.Set(cert, key, ca.CertPEM); err != nil {
		t.Fatal(err)
	}
	return h
}

// serve runs a TLS echo of the peer identity and returns its address.
func serve(t *testing.T, cfg *tls.Config) string {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		role, name, _ := Peer(r.TLS)
		io.WriteString(w, role+"/"+name)
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String()
}

func get(cfg *tls.Config, addr string) (string, error) {
	c := &http.Client{Transport: &http.Transport{TLSClientConfig: cfg}, Timeout: 5 * time.Second}
	resp, err := c.Get("https://" + addr + "/")
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

// TestMutualTLS: a host and a manager of one CA see each other's identity;
// a certificate from another CA is refused both ways; the server name is
// checked against the host's name.
func TestMutualTLS(t *testing.T) {
	ca, other := mustCA(t), mustCA(t)
	host := holder(t, ca, Profile{Role: RoleHost, Name: "h1", IPs: []net.IP{net.ParseIP("127.0.0.1")}})
	mgr := holder(t, ca, Profile{Role: RoleManager, Name: "m1"})
	rogue := holder(t, other, Profile{Role: RoleManager, Name: "m1"})
	srvCfg := ServerConfig(host, ca.Pool(), false)
	srvCfg.VerifyConnection = RequirePeer(RoleManager, "")
	addr := serve(t, srvCfg)

	if got, err := get(ClientConfig(ca.Pool(), mgr, "h1"), addr); err != nil || got != RoleManager+"/m1" {
		t.Fatalf("manager to host: %q, %v", got, err)
	}
	for name, cfg := range map[string]*tls.Config{
		"client cert from another ca":   ClientConfig(ca.Pool(), rogue, "h1"),
		"server from another ca":        ClientConfig(other.Pool(), mgr, "h1"),
		"no client cert":                ClientConfig(ca.Pool(), nil, "h1"),
		"a host calling a host":         ClientConfig(ca.Pool(), holder(t, ca, Profile{Role: RoleHost, Name: "h2"}), "h1"),
		"server is not the host wanted": ClientConfig(ca.Pool(), mgr, "h2"),
	} {
		if got, err := get(cfg, addr); err == nil {
			t.Errorf("%s: accepted (%q)", name, got)
		}
	}
}

func TestPinnedFirstContact(t *testing.T) {
	ca, other := mustCA(t), mustCA(t)
	mgr := holder(t, ca, Profile{Role: RoleManager, Name: "m1", IPs: []net.IP{net.ParseIP("127.0.0.1")}})
	addr := serve(t, ServerConfig(mgr, ca.Pool(), true))
	var seen *x509.Certificate
	if _, err := get(PinnedConfig(Fingerprint(ca.Cert), func(c *x509.Certificate) { seen = c }), addr); err != nil {
		t.Fatalf("pinned to the right ca: %v", err)
	}
	if seen == nil || !seen.Equal(ca.Cert) {
		t.Fatal("the pinned ca was not handed over")
	}
	if _, err := get(PinnedConfig(Fingerprint(other.Cert), nil), addr); err == nil || !strings.Contains(err.Error(), "fingerprint") {
		t.Fatalf("pinned to another ca: %v", err)
	}
	// A host certificate of the right CA is not a manager.
	hostSrv := serve(t, ServerConfig(holder(t, ca, Profile{Role: RoleHost, Name: "h9"}), nil, false))
	if _, err := get(PinnedConfig(Fingerprint(ca.Cert), nil), hostSrv); err == nil || !strings.Contains(err.Error(), "not a manager") {
		t.Fatalf("a host posing as the manager: %v", err)
	}
}

// TestSignIgnoresRequestedIdentity: the CA signs the identity it decides,
// not the one a request asks for.
func TestSignIgnoresRequestedIdentity(t *testing.T) {
	ca := mustCA(t)
	key, _, _ := NewKey()
	csrPEM, _ := NewCSR(key, "m-evil")
	csr, err := ParseCSR(csrPEM)
	if err != nil {
		t.Fatal(err)
	}
	certPEM, err := ca.Sign(csr, Profile{Role: RoleHost, Name: "h1", TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	c, _ := ParseCert(certPEM)
	if role, name := Identity(c); role != RoleHost || name != "h1" || c.NotAfter.Sub(c.NotBefore) > time.Hour+6*time.Minute {
		t.Fatalf("issued %s/%s valid %s", role, name, c.NotAfter.Sub(c.NotBefore))
	}
	if _, err := ca.Sign(csr, Profile{Role: "vigil-admins", Name: "x"}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("unknown role signed: %v", err)
	}
	if d := RenewAfter(c).Sub(c.NotBefore); d < 30*time.Minute || d > 33*time.Minute {
		t.Fatalf("renew after %s of a 1h certificate", d)
	}
}

func TestTokens(t *testing.T) {
	fp := Fingerprint(mustCA(t).Cert)
	j := NewJoinToken(fp)
	got, err := ParseJoinToken(" " + j.String() + "\n")
	if err != nil || got != j {
		t.Fatalf("round trip: %+v, %v", got, err)
	}
	for _, bad := range []string{"", "vj1", j.String()[:len(j.String())-1], strings.Replace(j.String(), "vj1", "vj2", 1),
		strings.ToUpper(j.String()), j.String() + ".x", "vj1.." + fp} {
		if _, err := ParseJoinToken(bad); !errors.Is(err, ErrInvalid) {
			t.Errorf("ParseJoinToken(%q) = %v", bad, err)
		}
	}
	a := NewAPIToken()
	if got, err := ParseAPIToken(a.String()); err != nil || got != a {
		t.Fatalf("api token round trip: %+v, %v", got, err)
	}
	if _, err := ParseAPIToken(j.String()); err == nil {
		t.Fatal("a join token passed as an api token")
	}
}

func FuzzJoinToken(f *testing.F) {
	f.Add(NewJoinToken(strings.Repeat("ab", 32)).String())
	f.Add("vj1.0123456789abcdef.0123456789abcdef0123456789abcdef." + strings.Repeat("0", 64))
	f.Add("vj1...")
	f.Add(NewAPIToken().String())
	f.Fuzz(func(t *testing.T, s string) {
		j, err := ParseJoinToken(s)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("error %v is not ErrInvalid", err)
			}
		} else if back, err := ParseJoinToken(j.String()); err != nil || back != j {
			t.Fatalf("%q parsed to %+v which does not round-trip: %+v %v", s, j, back, err)
		}
		if a, err := ParseAPIToken(s); err == nil {
			if back, _ := ParseAPIToken(a.String()); back != a {
				t.Fatalf("api token %q does not round-trip", s)
			}
		}
	})
}
