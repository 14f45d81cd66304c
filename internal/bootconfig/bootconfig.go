// Package bootconfig is the configuration a stateless host receives at
// every boot, signed with the cluster CA's key: the host verifies it against
// the CA certificate built into its image before it acts on any of it.
package bootconfig

import (
	"bytes"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"regexp"
	"strings"
	"time"

	"github.com/vigil-project/vigil/internal/pki"
)

// domain separates these signatures from anything else the CA signs.
const domain = "boot-config/v1"

// MaxSize bounds a signed configuration on the wire.
const MaxSize = 64 << 10

// Config is what a host is told at boot.
type Config struct {
	// Machine is who it is for: its boot MAC (lower case) and SMBIOS UUID.
	MAC  string `json:"mac"`
	UUID string `json:"uuid,omitempty"`
	// HostName is the name it joins the cluster with.
	HostName string `json:"host_name"`
	// Managers are the URLs of the managers (https://HOST:PORT).
	Managers []string `json:"managers"`
	// JoinToken is a one-use enrolment credential for this boot.
	JoinToken string `json:"join_token"`
	// Image is the digest of the host image the host's profile names.
	Image string `json:"image"`
	// Nonce is the one the host sent with its request: an answer made for
	// another request (a replayed one) does not carry it. It makes the
	// answer fresh without trusting the host's clock.
	Nonce string `json:"nonce"`
	// Profile is the boot profile the machine was given.
	Profile     string            `json:"profile"`
	StoragePool string            `json:"storage_pool,omitempty"`
	Labels      map[string]string `json:"labels,omitempty"`
	IssuedAt    time.Time         `json:"issued_at"`
	Expires     time.Time         `json:"expires"`
}

// Signed is a configuration as it travels: the exact bytes signed, and the
// signature.
type Signed struct {
	Config    []byte `json:"config"`
	Signature []byte `json:"signature"`
}

// Digest names the signed configuration (what a host ran with).
func (s Signed) Digest() string {
	h := sha256.Sum256(s.Config)
	return "sha256:" + hex.EncodeToString(h[:])
}

// Sign encodes c and signs it with the CA.
func Sign(ca *pki.CA, c Config) (Signed, error) {
	if err := c.check(); err != nil {
		return Signed{}, err
	}
	b, err := json.Marshal(c)
	if err != nil {
		return Signed{}, err
	}
	sig, err := ca.SignData(domain, b)
	if err != nil {
		return Signed{}, err
	}
	return Signed{Config: b, Signature: sig}, nil
}

// ErrRefused wraps every reason a host refuses a configuration.
var ErrRefused = errors.New("boot configuration refused")

// Verify checks that raw (a Signed, as JSON) is signed by the CA ca, is
// for the machine mac, and answers the request that sent nonce; it returns
// the configuration. The host's clock is not trusted (a machine's clock
// may be anything before it joins): the nonce makes the answer fresh.
func Verify(raw []byte, ca *x509.Certificate, mac, nonce string) (Config, Signed, error) {
	var s Signed
	if len(raw) > MaxSize {
		return Config{}, s, fmt.Errorf("%w: %d bytes, more than %d", ErrRefused, len(raw), MaxSize)
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&s); err != nil {
		return Config{}, s, fmt.Errorf("%w: not a signed configuration: %v", ErrRefused, err)
	}
	if err := pki.VerifyData(ca, domain, s.Config, s.Signature); err != nil {
		return Config{}, s, fmt.Errorf("%w: %v", ErrRefused, err)
	}
	var c Config
	dec = json.NewDecoder(bytes.NewReader(s.Config))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&c); err != nil {
		return Config{}, s, fmt.Errorf("%w: signed, but not a configuration: %v", ErrRefused, err)
	}
	if err := c.check(); err != nil {
		return Config{}, s, fmt.Errorf("%w: %v", ErrRefused, err)
	}
	if !strings.EqualFold(c.MAC, mac) {
		return Config{}, s, fmt.Errorf("%w: it is for machine %s, this is %s", ErrRefused, c.MAC, mac)
	}
	if nonce == "" || subtle.ConstantTimeCompare([]byte(c.Nonce), []byte(nonce)) != 1 {
		return Config{}, s, fmt.Errorf("%w: it does not answer this request (made for another, or replayed)", ErrRefused)
	}
	return c, s, nil
}

var hostNameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)

func (c Config) check() error {
	if _, err := net.ParseMAC(c.MAC); err != nil {
		return fmt.Errorf("bad machine address %q", c.MAC)
	}
	if !hostNameRE.MatchString(c.HostName) {
		return fmt.Errorf("bad host name %q", c.HostName)
	}
	if len(c.Managers) == 0 {
		return errors.New("no manager urls")
	}
	for _, m := range c.Managers {
		if !strings.HasPrefix(m, "https://") {
			return fmt.Errorf("manager url %q is not https", m)
		}
	}
	if c.JoinToken == "" {
		return errors.New("no join token")
	}
	if !c.Expires.After(c.IssuedAt) {
		return errors.New("expires before it is issued")
	}
	return nil
}
