package agent

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/vigil-project/vigil/internal/atomicfile"
	"github.com/vigil-project/vigil/internal/hostproto"
	"github.com/vigil-project/vigil/internal/pki"
)

// hostTrust is a host's credentials, kept in its data dir: its own key
// (made here, never sent anywhere), the certificate the managers issued for
// it, and the cluster CA it pinned when it joined.
type hostTrust struct {
	dir    string
	name   string
	holder *pki.Holder
	caPEM  []byte
	pool   *x509.CertPool
	// tlsDir, if set, receives the files QEMU's tls-creds-x509 reads, for
	// migration streams (see hostagent).
	tlsDir string
}

func (t *hostTrust) paths() (key, cert, ca string) {
	return filepath.Join(t.dir, "host.key"), filepath.Join(t.dir, "host.crt"), filepath.Join(t.dir, "ca.crt")
}

// load reads the credentials; ok is false when the host has not joined.
// Credentials for another name, or expired ones, are errors that say what
// to do.
func (t *hostTrust) load() (ok bool, err error) {
	kp, cp, cap := t.paths()
	keyPEM, err := os.ReadFile(kp)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	certPEM, err := os.ReadFile(cp)
	if err != nil {
		return false, err
	}
	caPEM, err := os.ReadFile(cap)
	if err != nil {
		return false, err
	}
	if err := t.install(certPEM, keyPEM, caPEM); err != nil {
		return false, fmt.Errorf("credentials in %s: %w", t.dir, err)
	}
	leaf := t.holder.Leaf()
	if role, name := pki.Identity(leaf); role != pki.RoleHost || name != t.name {
		return false, fmt.Errorf("the certificate in %s is for %s %q, not host %q: use another --data-dir, or remove %s to join anew", t.dir, role, name, t.name, cp)
	}
	if time.Now().After(leaf.NotAfter) {
		return false, fmt.Errorf("this host's certificate expired at %s (the host was away longer than its certificate lives): join again with a token from 'vigil host join-token --host %s'", leaf.NotAfter.Format(time.RFC3339), t.name)
	}
	return true, t.writeQEMUFiles(certPEM, keyPEM, caPEM)
}

func (t *hostTrust) install(certPEM, keyPEM, caPEM []byte) error {
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return errors.New("the cluster ca is not a PEM certificate")
	}
	if t.holder == nil {
		t.holder = &pki.Holder{}
	}
	if err := t.holder.Set(certPEM, keyPEM, caPEM); err != nil {
		return err
	}
	t.caPEM, t.pool = caPEM, pool
	return nil
}

// save installs and writes new credentials (the key first: a crash in
// between leaves a key without its certificate, which load refuses, rather
// than a certificate for a lost key).
func (t *hostTrust) save(certPEM, keyPEM, caPEM []byte) error {
	if err := t.install(certPEM, keyPEM, caPEM); err != nil {
		return err
	}
	kp, cp, cap := t.paths()
	for _, f := range []struct {
		path string
		b    []byte
		mode os.FileMode
	}{{kp, keyPEM, 0o600}, {cp, certPEM, 0o644}, {cap, caPEM, 0o644}} {
		if err := atomicfile.WriteFile(f.path, f.b, f.mode); err != nil {
			return fmt.Errorf("keep credentials: %w", err)
		}
	}
	return t.writeQEMUFiles(certPEM, keyPEM, caPEM)
}

// writeQEMUFiles lays the credentials out as QEMU's tls-creds-x509 wants
// them (the host's certificate serves both ends of a migration).
func (t *hostTrust) writeQEMUFiles(certPEM, keyPEM, caPEM []byte) error {
	if t.tlsDir == "" {
		return nil
	}
	if err := os.MkdirAll(t.tlsDir, 0o700); err != nil {
		return err
	}
	for name, b := range map[string][]byte{"ca-cert.pem": caPEM, "server-cert.pem": certPEM, "server-key.pem": keyPEM,
		"client-cert.pem": certPEM, "client-key.pem": keyPEM} {
		if err := atomicfile.WriteFile(filepath.Join(t.tlsDir, name), b, 0o600); err != nil {
			return fmt.Errorf("write qemu tls credentials: %w", err)
		}
	}
	return nil
}

// serverTLS serves the host API: a manager of the cluster may call, and
// another host of the cluster may connect for the one operation hostGate
// lets it open.
func (t *hostTrust) serverTLS() *tls.Config {
	c := pki.ServerConfig(t.holder, t.pool, false)
	c.VerifyConnection = func(cs tls.ConnectionState) error {
		if role, _, ok := pki.Peer(&cs); ok && role == pki.RoleHost {
			return nil
		}
		return pki.RequirePeer(pki.RoleManager, "")(cs)
	}
	return c
}

// hostGate lets managers call every host operation, and other hosts of the
// cluster only open the checkpoint stream of a VM whose standby this host
// keeps for them (the call carries the caller's name from its certificate).
func hostGate(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		role, name, ok := pki.Peer(r.TLS)
		switch {
		case ok && role == pki.RoleManager:
			h.ServeHTTP(w, r)
		case ok && role == pki.RoleHost && r.Method == http.MethodPost && r.URL.Path == hostproto.TunnelPath(hostproto.CheckpointsOp):
			h.ServeHTTP(w, r.WithContext(hostproto.WithPeerHost(r.Context(), name)))
		default:
			http.Error(w, "forbidden: a host may only send checkpoints to another host", http.StatusForbidden)
		}
	})
}

// peerTLS is the client configuration for reaching host name: it must
// present that host's certificate of the cluster.
func (t *hostTrust) peerTLS(name string) *tls.Config {
	c := pki.ClientConfig(t.pool, t.holder, "")
	c.VerifyConnection = pki.RequirePeer(pki.RoleHost, name)
	return c
}

// clientTLS calls the managers: they must present a manager certificate
// of the cluster for the address dialled; the host presents its own.
func (t *hostTrust) clientTLS() *tls.Config {
	c := pki.ClientConfig(t.pool, t.holder, "")
	c.VerifyConnection = func(cs tls.ConnectionState) error {
		if role, _, ok := pki.Peer(&cs); !ok || role != pki.RoleManager {
			return fmt.Errorf("the server is not a manager of this cluster (%s)", role)
		}
		return nil
	}
	return c
}

// join makes a key and asks a manager (reached over TLS pinned to the
// token's CA fingerprint) for a certificate.
func (t *hostTrust) join(ctx context.Context, managerURL, token string, reg hostproto.Register) error {
	tok, err := pki.ParseJoinToken(token)
	if err != nil {
		return fmt.Errorf("%w: --join-token: %v", errRefused, err)
	}
	key, keyPEM, err := pki.NewKey()
	if err != nil {
		return err
	}
	csr, err := pki.NewCSR(key, t.name)
	if err != nil {
		return err
	}
	var ca *x509.Certificate
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: pki.PinnedConfig(tok.CAFingerprint, func(c *x509.Certificate) { ca = c })}}
	var out hostproto.Joined
	if err := postJSON(ctx, hc, strings.TrimRight(managerURL, "/")+"/v1/hosts/join",
		hostproto.Join{Name: t.name, Token: token, CSR: string(csr), Register: reg}, &out); err != nil {
		if errors.Is(err, pki.ErrNotPinned) {
			return fmt.Errorf("%w: %s: %v", errRefused, managerURL, err)
		}
		return err
	}
	got, err := pki.ParseCert([]byte(out.CA))
	if err != nil || ca == nil || !got.Equal(ca) {
		return fmt.Errorf("%w: the manager answered with a ca other than the one it presented", errRefused)
	}
	return t.save([]byte(out.Cert), keyPEM, []byte(out.CA))
}

// renew asks for a certificate for a new key, over mutual TLS with the
// current one.
func (t *hostTrust) renew(ctx context.Context, hc *http.Client, managerURL string) error {
	key, keyPEM, err := pki.NewKey()
	if err != nil {
		return err
	}
	csr, err := pki.NewCSR(key, t.name)
	if err != nil {
		return err
	}
	var out hostproto.Joined
	if err := postJSON(ctx, hc, strings.TrimRight(managerURL, "/")+"/v1/hosts/"+t.name+"/certificate", hostproto.Renew{CSR: string(csr)}, &out); err != nil {
		return err
	}
	return t.save([]byte(out.Cert), keyPEM, []byte(out.CA))
}

// postJSON posts body and decodes the answer into out; an error answer
// becomes an error carrying the manager's sentence (errRefused for 401 and
// 403: the operator must act).
func postJSON(ctx context.Context, hc *http.Client, url string, body, out any) error {
	_, err := post(ctx, hc, url, body, out)
	return err
}

// post is postJSON that also returns the answer's header.
func post(ctx context.Context, hc *http.Client, url string, body, out any) (http.Header, error) {
	b, _ := json.Marshal(body)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(b))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := hc.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 {
		var e struct {
			Error string `json:"error"`
		}
		json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&e)
		switch resp.StatusCode {
		case http.StatusUnauthorized, http.StatusForbidden:
			return resp.Header, fmt.Errorf("%w: %s", errRefused, e.Error)
		case http.StatusGone:
			return resp.Header, errDeclaredDead
		case http.StatusConflict:
			return resp.Header, fmt.Errorf("%w: %s", errConflict, e.Error)
		case http.StatusNotFound:
			return resp.Header, fmt.Errorf("%w: %s", errNotFound, e.Error)
		}
		return resp.Header, fmt.Errorf("%s: %s", resp.Status, e.Error)
	}
	if out != nil {
		return resp.Header, json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(out)
	}
	return resp.Header, nil
}
