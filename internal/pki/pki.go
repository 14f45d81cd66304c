// Package pki is Vigil's cluster certificate authority and the
// certificates it issues: ECDSA P-256 keys, X.509 certificates from Go's
// crypto/x509, TLS 1.3. A certificate's subject says who holds it: the
// organization is the role (managers or hosts), the common name the name.
package pki

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"slices"
	"time"
)

// Roles, as the organization of a certificate's subject.
const (
	RoleManager = "vigil-managers"
	RoleHost    = "vigil-hosts"
)

// DefaultTTL is how long a node certificate is valid; nodes renew well
// before (see RenewAfter).
const DefaultTTL = 24 * time.Hour

// caTTL is the life of the cluster CA.
const caTTL = 10 * 365 * 24 * time.Hour

// ErrInvalid is a malformed key, request or certificate.
var ErrInvalid = errors.New("invalid certificate material")

// CA is the cluster certificate authority.
type CA struct {
	Cert    *x509.Certificate
	CertPEM []byte
	key     crypto.Signer
}

// NewCA makes a CA for a cluster. The key is returned PEM-encoded for the
// store; it never goes anywhere else.
func NewCA(cluster string) (*CA, []byte, error) {
	key, keyPEM, err := NewKey()
	if err != nil {
		return nil, nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "vigil cluster CA " + cluster, Organization: []string{"vigil"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(caTTL),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, nil, fmt.Errorf("make cluster ca: %w", err)
	}
	ca, err := ParseCA(pemBlock("CERTIFICATE", der), keyPEM)
	return ca, keyPEM, err
}

// ParseCA loads a CA from its certificate and key.
func ParseCA(certPEM, keyPEM []byte) (*CA, error) {
	cert, err := ParseCert(certPEM)
	if err != nil {
		return nil, err
	}
	key, err := ParseKey(keyPEM)
	if err != nil {
		return nil, err
	}
	if !cert.IsCA {
		return nil, fmt.Errorf("%w: the cluster ca certificate is not a ca", ErrInvalid)
	}
	pub, ok := key.Public().(*ecdsa.PublicKey)
	if !ok || !pub.Equal(cert.PublicKey) {
		return nil, fmt.Errorf("%w: the cluster ca key does not match its certificate", ErrInvalid)
	}
	return &CA{Cert: cert, CertPEM: certPEM, key: key}, nil
}

// Profile is what a certificate says.
type Profile struct {
	Role     string // RoleManager or RoleHost
	Name     string
	DNSNames []string
	IPs      []net.IP
	TTL      time.Duration
}

// Sign issues a certificate for the key of csr, with what profile says: the
// request's own subject and names are ignored (a node gets only the
// identity it is entitled to). Node certificates serve and authenticate:
// every node both listens and calls.
func (ca *CA) Sign(csr *x509.CertificateRequest, p Profile) ([]byte, error) {
	if p.Role != RoleManager && p.Role != RoleHost {
		return nil, fmt.Errorf("%w: unknown role %q", ErrInvalid, p.Role)
	}
	if p.TTL <= 0 {
		p.TTL = DefaultTTL
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: p.Name, Organization: []string{p.Role}},
		NotBefore:    now.Add(-min(5*time.Minute, p.TTL/10)), // small clock skews between nodes
		NotAfter:     now.Add(p.TTL),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		DNSNames:     slices.Compact(append([]string{p.Name}, p.DNSNames...)),
		IPAddresses:  p.IPs,
	}
	if tmpl.NotAfter.After(ca.Cert.NotAfter) {
		tmpl.NotAfter = ca.Cert.NotAfter
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, csr.PublicKey, ca.key)
	if err != nil {
		return nil, fmt.Errorf("sign certificate for %s: %w", p.Name, err)
	}
	return pemBlock("CERTIFICATE", der), nil
}

// Issue makes a key and a certificate for it in one go (for the manager's
// own certificate: it holds the CA).
func (ca *CA) Issue(p Profile) (certPEM, keyPEM []byte, err error) {
	key, keyPEM, err := NewKey()
	if err != nil {
		return nil, nil, err
	}
	csrPEM, err := NewCSR(key, p.Name)
	if err != nil {
		return nil, nil, err
	}
	csr, err := ParseCSR(csrPEM)
	if err != nil {
		return nil, nil, err
	}
	certPEM, err = ca.Sign(csr, p)
	return certPEM, keyPEM, err
}

// Pool is a cert pool holding only the CA.
func (ca *CA) Pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.Cert)
	return p
}

// NewKey makes an ECDSA P-256 key, and its PEM.
func NewKey() (crypto.Signer, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("make key: %w", err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, fmt.Errorf("encode key: %w", err)
	}
	return key, pemBlock("PRIVATE KEY", der), nil
}

// ParseKey reads a PEM private key.
func ParseKey(keyPEM []byte) (crypto.Signer, error) {
	b, _ := pem.Decode(keyPEM)
	if b == nil || b.Type != "PRIVATE KEY" {
		return nil, fmt.Errorf("%w: not a PEM private key", ErrInvalid)
	}
	k, err := x509.ParsePKCS8PrivateKey(b.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	s, ok := k.(*ecdsa.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("%w: the key is not ECDSA", ErrInvalid)
	}
	return s, nil
}

// NewCSR makes a certificate request for key, naming name.
func NewCSR(key crypto.Signer, name string) ([]byte, error) {
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: name}}, key)
	if err != nil {
		return nil, fmt.Errorf("make certificate request: %w", err)
	}
	return pemBlock("CERTIFICATE REQUEST", der), nil
}

// ParseCSR reads a PEM certificate request and checks its signature (the
// requester holds the key).
func ParseCSR(csrPEM []byte) (*x509.CertificateRequest, error) {
	b, _ := pem.Decode(csrPEM)
	if b == nil || b.Type != "CERTIFICATE REQUEST" {
		return nil, fmt.Errorf("%w: not a PEM certificate request", ErrInvalid)
	}
	csr, err := x509.ParseCertificateRequest(b.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("%w: certificate request signature: %v", ErrInvalid, err)
	}
	if _, ok := csr.PublicKey.(*ecdsa.PublicKey); !ok {
		return nil, fmt.Errorf("%w: the requested key is not ECDSA", ErrInvalid)
	}
	return csr, nil
}

// ParseCert reads the first PEM certificate.
func ParseCert(certPEM []byte) (*x509.Certificate, error) {
	b, _ := pem.Decode(certPEM)
	if b == nil || b.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("%w: not a PEM certificate", ErrInvalid)
	}
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	return c, nil
}

// Fingerprint is the SHA-256 of a certificate's public key (its
// SubjectPublicKeyInfo), in hex: what a join token pins, as kubeadm's
// discovery-token-ca-cert-hash does.
func Fingerprint(c *x509.Certificate) string {
	sum := sha256.Sum256(c.RawSubjectPublicKeyInfo)
	return hex.EncodeToString(sum[:])
}

// Identity is the role and name a verified certificate carries.
func Identity(c *x509.Certificate) (role, name string) {
	if len(c.Subject.Organization) == 1 {
		role = c.Subject.Organization[0]
	}
	return role, c.Subject.CommonName
}

// RenewAfter is when a certificate should be renewed: half way through its
// life, so a node survives a manager outage of half a TTL.
func RenewAfter(c *x509.Certificate) time.Time {
	return c.NotBefore.Add(c.NotAfter.Sub(c.NotBefore) / 2)
}

// KeyPair makes a tls.Certificate from PEM (the leaf parsed).
func KeyPair(certPEM, keyPEM []byte) (tls.Certificate, error) {
	kp, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return kp, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	return kp, nil
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	return n
}

func pemBlock(typ string, der []byte) []byte {
	var b bytes.Buffer
	pem.Encode(&b, &pem.Block{Type: typ, Bytes: der})
	return b.Bytes()
}

// SignData signs data with the CA's key, for the purpose named by domain
// (so that a signature made for one purpose means nothing for another).
func (ca *CA) SignData(domain string, data []byte) ([]byte, error) {
	sig, err := ca.key.Sign(rand.Reader, dataDigest(domain, data), crypto.SHA256)
	if err != nil {
		return nil, fmt.Errorf("sign %s: %w", domain, err)
	}
	return sig, nil
}

// VerifyData checks a SignData signature against the CA certificate ca.
func VerifyData(ca *x509.Certificate, domain string, data, sig []byte) error {
	pub, ok := ca.PublicKey.(*ecdsa.PublicKey)
	if !ok {
		return fmt.Errorf("%w: the CA key is not ECDSA", ErrInvalid)
	}
	if !ecdsa.VerifyASN1(pub, dataDigest(domain, data), sig) {
		return fmt.Errorf("%w: the %s signature does not verify against CA %s", ErrInvalid, domain, Fingerprint(ca))
	}
	return nil
}

func dataDigest(domain string, data []byte) []byte {
	h := sha256.New()
	fmt.Fprintf(h, "vigil signed data: %s\n", domain)
	h.Write(data)
	return h.Sum(nil)
}
