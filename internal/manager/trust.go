package manager

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/vigil-project/vigil/internal/pki"
	"github.com/vigil-project/vigil/internal/store"
)

// caRecord is the cluster CA under "pki/ca". Its key lives only here (and
// in the memory of the managers): it is never logged nor sent to a host.
type caRecord struct {
	CertPEM string    `json:"cert_pem"`
	KeyPEM  string    `json:"key_pem"`
	Created time.Time `json:"created"`
}

// LoadOrCreateCA returns the cluster CA, creating it if this is the first
// manager (two managers starting at once agree: the store keeps the first).
func LoadOrCreateCA(ctx context.Context, s *store.Store, cluster string) (*pki.CA, error) {
	for attempt := 0; attempt < 2; attempt++ {
		ca, err := LoadCA(ctx, s)
		if err == nil || !errors.Is(err, store.ErrNotFound) {
			return ca, err
		}
		ca, keyPEM, err := pki.NewCA(cluster)
		if err != nil {
			return nil, err
		}
		_, err = s.Create(ctx, "pki/ca", caRecord{CertPEM: string(ca.CertPEM), KeyPEM: string(keyPEM), Created: time.Now().UTC()})
		if err == nil {
			return ca, nil
		}
		if !errors.Is(err, store.ErrExists) {
			return nil, fmt.Errorf("store the cluster ca: %w", err)
		}
	}
	return nil, errors.New("the cluster ca could not be read nor created")
}

// LoadCA reads the cluster CA (with its key) from the store; an error
// wrapping store.ErrNotFound if no manager made one yet.
func LoadCA(ctx context.Context, s *store.Store) (*pki.CA, error) {
	var rec caRecord
	if _, err := s.Get(ctx, "pki/ca", &rec); err != nil {
		return nil, fmt.Errorf("read the cluster ca: %w", err)
	}
	ca, err := pki.ParseCA([]byte(rec.CertPEM), []byte(rec.KeyPEM))
	if err != nil {
		return nil, fmt.Errorf("the cluster ca in the store is damaged: %w", err)
	}
	return ca, nil
}

// Identity is this manager's certificate, renewed before it expires.
type Identity struct {
	CA     *pki.CA
	Holder *pki.Holder
	name   string
	names  []string
	ips    []net.IP
	ttl    time.Duration
}

// NewIdentity issues this manager's certificate for the addresses it is
// reached at (the listen address; every local address when it listens on
// all of them), and its name.
func NewIdentity(ca *pki.CA, name, listen string, ttl time.Duration) (*Identity, error) {
	id := &Identity{CA: ca, Holder: &pki.Holder{}, name: name, ttl: ttl}
	host, _, err := net.SplitHostPort(listen)
	if err != nil {
		return nil, fmt.Errorf("listen address %q: %w", listen, err)
	}
	id.names = []string{"localhost"}
	if hn, err := os.Hostname(); err == nil {
		id.names = append(id.names, hn)
	}
	id.ips = []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback}
	switch ip := net.ParseIP(host); {
	case ip == nil && host != "":
		id.names = append(id.names, host)
	case ip == nil || ip.IsUnspecified():
		addrs, _ := net.InterfaceAddrs()
		for _, a := range addrs {
			if n, ok := a.(*net.IPNet); ok {
				id.ips = append(id.ips, n.IP)
			}
		}
	default:
		id.ips = append(id.ips, ip)
	}
	if err := id.renew(); err != nil {
		return nil, err
	}
	return id, nil
}

func (id *Identity) renew() error {
	cert, key, err := id.CA.Issue(pki.Profile{Role: pki.RoleManager, Name: id.name, DNSNames: id.names, IPs: id.ips, TTL: id.ttl})
	if err != nil {
		return err
	}
	return id.Holder.Set(cert, key, id.CA.CertPEM)
}

// ServerTLS is the API's TLS: the manager's certificate; a client
// certificate is verified when given (hosts), not required (users have
// tokens).
func (id *Identity) ServerTLS() *tls.Config {
	c := pki.ServerConfig(id.Holder, id.CA.Pool(), true)
	// HTTP/2 for browsers: the dashboard keeps streams open (events, a
	// console), and over HTTP/1.1 a browser's six connections per server
	// run out. The CLI's client stays on HTTP/1.1, whose Upgrade its
	// tunnels use (client.NewFromConfig); hosts' heartbeats may use either.
	c.NextProtos = []string{"h2", "http/1.1"}
	return c
}

// HostClientTLS is how the manager calls host name: it must present a host
// certificate for that name, and gets the manager's.
func (id *Identity) HostClientTLS(name string) *tls.Config {
	c := pki.ClientConfig(id.CA.Pool(), id.Holder, name)
	c.VerifyConnection = pki.RequirePeer(pki.RoleHost, name)
	return c
}

// KeepRenewed renews the certificate half way through its life, until ctx
// ends.
func (id *Identity) KeepRenewed(ctx context.Context, log interface {
	Warn(string, ...any)
}) {
	for {
		next := time.Until(pki.RenewAfter(id.Holder.Leaf()))
		select {
		case <-ctx.Done():
			return
		case <-time.After(max(next, time.Second)):
		}
		if err := id.renew(); err != nil {
			log.Warn("renew the manager's certificate", "err", err)
			select {
			case <-ctx.Done():
				return
			case <-time.After(time.Minute):
			}
		}
	}
}

// Leaf is the manager's current certificate.
func (id *Identity) Leaf() *x509.Certificate { return id.Holder.Leaf() }
