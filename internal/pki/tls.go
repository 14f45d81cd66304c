package pki

import (
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
)

// ErrNotPinned: a server's CA is not the one a join token pins.
var ErrNotPinned = errors.New("the manager's ca does not match the join token's fingerprint: this is not the cluster the token was made for (or someone is in between)")

// Holder keeps a node's current certificate; renewal swaps it under
// running servers and clients.
type Holder struct {
	cur atomic.Pointer[tls.Certificate]
}

// Set installs a certificate (with the CA appended to the chain it
// presents, so a peer that pins the CA by fingerprint can see it).
func (h *Holder) Set(certPEM, keyPEM, caPEM []byte) error {
	chain := append(append([]byte{}, certPEM...), caPEM...)
	kp, err := KeyPair(chain, keyPEM)
	if err != nil {
		return err
	}
	h.cur.Store(&kp)
	return nil
}

// Leaf is the current certificate (nil before Set).
func (h *Holder) Leaf() *x509.Certificate {
	if c := h.cur.Load(); c != nil {
		return c.Leaf
	}
	return nil
}

func (h *Holder) get() (*tls.Certificate, error) {
	if c := h.cur.Load(); c != nil {
		return c, nil
	}
	return nil, errors.New("no certificate yet")
}

// ServerConfig is TLS 1.3 with h's certificate. With clients set, a client
// certificate signed by those CAs is required (mutual TLS); with optional,
// it is verified if given (the manager's API serves users with tokens and
// hosts with certificates on one port).
func ServerConfig(h *Holder, clients *x509.CertPool, optional bool) *tls.Config {
	c := &tls.Config{
		MinVersion:     tls.VersionTLS13,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return h.get() },
	}
	if clients != nil {
		c.ClientCAs = clients
		c.ClientAuth = tls.RequireAndVerifyClientCert
		if optional {
			c.ClientAuth = tls.VerifyClientCertIfGiven
		}
	}
	return c
}

// ClientConfig is TLS 1.3 trusting only roots, expecting the server to be
// serverName (empty: the address dialled), presenting h's certificate when
// h is not nil.
func ClientConfig(roots *x509.CertPool, h *Holder, serverName string) *tls.Config {
	c := &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: roots, ServerName: serverName}
	if h != nil {
		c.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return h.get() }
	}
	return c
}

// Peer is the verified identity at the other end of a TLS connection.
func Peer(cs *tls.ConnectionState) (role, name string, ok bool) {
	if cs == nil || len(cs.VerifiedChains) == 0 || len(cs.VerifiedChains[0]) == 0 {
		return "", "", false
	}
	role, name = Identity(cs.VerifiedChains[0][0])
	return role, name, true
}

// RequirePeer is a VerifyConnection check: the peer's verified certificate
// has role (and, if name is not empty, that name).
func RequirePeer(role, name string) func(tls.ConnectionState) error {
	return func(cs tls.ConnectionState) error {
		r, n, ok := Peer(&cs)
		if !ok {
			return errors.New("no verified certificate from the peer")
		}
		if r != role || (name != "" && n != name) {
			return fmt.Errorf("the peer is %s %q, not %s %q", r, n, role, name)
		}
		return nil
	}
}

// PinnedConfig is a client config for first contact with a manager, when
// the only thing known of the cluster is its CA's fingerprint (from a join
// token): the server must present a chain with a CA of that fingerprint,
// and a manager certificate that CA signed. got receives that CA.
func PinnedConfig(fingerprint string, got func(*x509.Certificate)) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		// The usual verification needs roots we do not have yet; the pin
		// below is the verification.
		InsecureSkipVerify: true,
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			var certs []*x509.Certificate
			for _, r := range raw {
				c, err := x509.ParseCertificate(r)
				if err != nil {
					return fmt.Errorf("manager certificate: %w", err)
				}
				certs = append(certs, c)
			}
			if len(certs) == 0 {
				return errors.New("the manager presented no certificate")
			}
			for _, ca := range certs[1:] {
				if !ca.IsCA || subtle.ConstantTimeCompare([]byte(Fingerprint(ca)), []byte(strings.ToLower(fingerprint))) != 1 {
					continue
				}
				pool := x509.NewCertPool()
				pool.AddCert(ca)
				if _, err := certs[0].Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
					return fmt.Errorf("the manager's certificate is not signed by the pinned ca: %w", err)
				}
				if role, _ := Identity(certs[0]); role != RoleManager {
					return fmt.Errorf("the server is a %s, not a manager", role)
				}
				if got != nil {
					got(ca)
				}
				return nil
			}
			return ErrNotPinned
		},
	}
}
