package client

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"

	"sigs.k8s.io/yaml"

	"github.com/vigil-project/vigil/internal/atomicfile"
)

// Config is how to reach and authenticate to a Vigil manager: the API's
// URL, the cluster CA that signed the API's certificate, and an API token.
// Agents write one (DATA_DIR/client.yaml, mode 0600) for their admin.
type Config struct {
	URL    string `json:"url"`
	CACert string `json:"ca_cert"` // PEM
	Token  string `json:"token"`
	// WrittenBy marks a file an agent wrote, which it may overwrite.
	WrittenBy string `json:"written_by,omitempty"`
}

// DefaultConfigPath is the user's CLI configuration:
// $XDG_CONFIG_HOME/vigil/config.yaml, or ~/.config/vigil/config.yaml.
func DefaultConfigPath() string {
	dir := os.Getenv("XDG_CONFIG_HOME")
	if dir == "" {
		home, _ := os.UserHomeDir()
		dir = filepath.Join(home, ".config")
	}
	return filepath.Join(dir, "vigil", "config.yaml")
}

// LoadConfig reads a configuration file.
func LoadConfig(path string) (Config, error) {
	var c Config
	b, err := os.ReadFile(path)
	if err != nil {
		return c, fmt.Errorf("read vigil config %s: %w", path, err)
	}
	if err := yaml.UnmarshalStrict(b, &c); err != nil {
		return c, fmt.Errorf("vigil config %s: %w", path, err)
	}
	if c.URL == "" {
		return c, fmt.Errorf("vigil config %s has no url", path)
	}
	return c, nil
}

// WriteConfig writes c to path, readable by its owner only.
func WriteConfig(path string, c Config) error {
	b, err := yaml.Marshal(c)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return fmt.Errorf("write vigil config: %w", err)
	}
	return atomicfile.WriteFile(path, b, 0o600)
}

// NewFromConfig returns a client for c: HTTPS trusting only c's CA, with
// c's token on every request.
func NewFromConfig(c Config) (*Client, error) {
	base := strings.TrimRight(c.URL, "/")
	if !strings.Contains(base, "://") {
		base = "https://" + base
	}
	if strings.HasPrefix(base, "http://") {
		return nil, fmt.Errorf("the vigil api is https only: use https://%s", strings.TrimPrefix(base, "http://"))
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS13}
	// HTTP/1.1: the API's tunnels (the VNC console) are an Upgrade of the
	// connection, which HTTP/2 has not (managers offer HTTP/2 for browsers).
	tr.ForceAttemptHTTP2 = false
	tr.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
	if c.CACert != "" {
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM([]byte(c.CACert)) {
			return nil, errors.New("the vigil config's ca_cert is not a PEM certificate")
		}
		tr.TLSClientConfig.RootCAs = pool
	}
	return &Client{base: base, token: c.Token, http: &http.Client{Transport: tr}}, nil
}

// ForConfigFile is a client for the configuration in the file at path; if
// it cannot be read, every call fails with the reason.
func ForConfigFile(path string) *Client {
	cfg, err := LoadConfig(path)
	if err != nil {
		return Unusable(err)
	}
	c, err := NewFromConfig(cfg)
	if err != nil {
		return Unusable(err)
	}
	return c
}

// Unusable is a client whose every call fails with err (a configuration
// that could not be loaded), so callers report it where they would have
// reported an unreachable API.
func Unusable(err error) *Client { return &Client{err: err} }
