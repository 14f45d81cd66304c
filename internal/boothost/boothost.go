// Package boothost is what a network-booted host runs first. It learns
// where it booted from (the kernel command line the boot service's iPXE
// script wrote), fetches its configuration from the boot service over TLS
// checked against the cluster CA built into its image, verifies the
// configuration's signature, and hands it to the host agent. A machine the
// cluster has not admitted waits, asking again, without credentials; a
// configuration that does not verify is refused and reported, and the
// host does not join.
package boothost

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/vigil-project/vigil/internal/bootconfig"
	"github.com/vigil-project/vigil/internal/pki"
)

// Params is what the kernel command line and the firmware say.
type Params struct {
	ConfigURL string // vigil.boot=https://HOST:PORT
	MAC       string // vigil.bootmac=
	Image     string // vigil.image= (as the boot service claims)
	// KernelURL (vigil.kernel=http://...) is where the boot service serves
	// this image's kernel: the built-in guest's too, when it is the same.
	KernelURL string
	UUID      string // SMBIOS product UUID
	// Vendor and Product are SMBIOS's manufacturer and product name.
	Vendor, Product string
}

// ParseCmdline reads Params from a kernel command line.
func ParseCmdline(cmdline string) (Params, error) {
	var p Params
	for _, f := range strings.Fields(cmdline) {
		k, v, _ := strings.Cut(f, "=")
		switch k {
		case "vigil.boot":
			p.ConfigURL = v
		case "vigil.bootmac":
			p.MAC = strings.ToLower(v)
		case "vigil.image":
			p.Image = v
		case "vigil.kernel":
			if u, err := url.Parse(v); err == nil && u.Scheme == "http" && u.Host != "" {
				p.KernelURL = v
			}
		}
	}
	u, err := url.Parse(p.ConfigURL)
	if p.ConfigURL == "" || err != nil || u.Scheme != "https" || u.Host == "" {
		return p, fmt.Errorf("no boot service on the kernel command line (vigil.boot=https://HOST:PORT, got %q): boot through Vigil's boot service", p.ConfigURL)
	}
	if _, err := net.ParseMAC(p.MAC); err != nil {
		return p, fmt.Errorf("no boot interface address on the kernel command line (vigil.bootmac=, got %q)", p.MAC)
	}
	return p, nil
}

// Request is what a host sends the boot service.
type Request struct {
	MAC   string `json:"mac"`
	UUID  string `json:"uuid,omitempty"`
	Image string `json:"image,omitempty"`
	// Vendor and Product: what the firmware says the machine is (SMBIOS).
	Vendor  string `json:"vendor,omitempty"`
	Product string `json:"product,omitempty"`
	// Nonce, in a request for the configuration, must come back in it.
	Nonce string `json:"nonce,omitempty"`
	// Error, in a report, says why the host refused what it was sent.
	Error string `json:"error,omitempty"`
}

// Paths of the boot service's TLS endpoints.
const (
	ConfigPath = "/v1/boot/config"
	ReportPath = "/v1/boot/report"
)

// ErrQuarantined is the boot service's answer for a machine not admitted.
var ErrQuarantined = errors.New("this machine is not admitted to the cluster")

// Client fetches a host's configuration.
type Client struct {
	Params
	CA   *x509.Certificate
	HTTP *http.Client
	Log  *slog.Logger
	// Retry is how long to wait between attempts (default 3 s).
	Retry time.Duration
}

// NewClient makes a client that trusts only a manager certified by ca.
func NewClient(p Params, ca *x509.Certificate, log *slog.Logger) *Client {
	tr := &http.Transport{TLSClientConfig: pki.PinnedConfig(pki.Fingerprint(ca), nil)}
	return &Client{Params: p, CA: ca, Log: log,
		HTTP: &http.Client{Transport: tr, Timeout: 15 * time.Second}}
}

// Fetch asks until it has a configuration that verifies, or ctx ends.
// While the machine is quarantined it keeps asking; a configuration that
// does not verify is reported and asked for again (a tampered answer on
// the way may not be tampered with next time), never used.
func (c *Client) Fetch(ctx context.Context) (bootconfig.Config, bootconfig.Signed, error) {
	wait := c.Retry
	if wait == 0 {
		wait = 3 * time.Second
	}
	for {
		cfg, s, err := c.fetchOnce(ctx)
		if err == nil {
			return cfg, s, nil
		}
		switch {
		case errors.Is(err, ErrQuarantined):
			c.Log.Warn("waiting to be admitted: by an operator ('vigil boot admit') or a boot rule ('vigil boot rule create')", "mac", c.MAC, "err", err)
		case errors.Is(err, bootconfig.ErrRefused):
			c.Log.Error("refused the boot configuration", "mac", c.MAC, "err", err)
			c.report(ctx, err)
		default:
			c.Log.Warn("boot configuration not fetched", "url", c.ConfigURL, "err", err)
		}
		select {
		case <-ctx.Done():
			return bootconfig.Config{}, bootconfig.Signed{}, ctx.Err()
		case <-time.After(wait):
		}
	}
}

func (c *Client) fetchOnce(ctx context.Context) (bootconfig.Config, bootconfig.Signed, error) {
	var n [16]byte
	if _, err := rand.Read(n[:]); err != nil {
		return bootconfig.Config{}, bootconfig.Signed{}, err
	}
	nonce := hex.EncodeToString(n[:])
	resp, err := c.post(ctx, ConfigPath, Request{MAC: c.MAC, UUID: c.UUID, Vendor: c.Vendor, Product: c.Product, Image: c.Image, Nonce: nonce})
	if err != nil {
		return bootconfig.Config{}, bootconfig.Signed{}, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, bootconfig.MaxSize+1))
	if err != nil {
		return bootconfig.Config{}, bootconfig.Signed{}, fmt.Errorf("read the boot configuration: %w", err)
	}
	switch resp.StatusCode {
	case http.StatusOK:
	case http.StatusTooManyRequests:
		return bootconfig.Config{}, bootconfig.Signed{}, fmt.Errorf("boot service busy: %s", errorText(body))
	case http.StatusForbidden:
		return bootconfig.Config{}, bootconfig.Signed{}, fmt.Errorf("%w: %s", ErrQuarantined, errorText(body))
	default:
		return bootconfig.Config{}, bootconfig.Signed{}, fmt.Errorf("boot service answered %s: %s", resp.Status, errorText(body))
	}
	return bootconfig.Verify(body, c.CA, c.MAC, nonce)
}

func (c *Client) report(ctx context.Context, problem error) {
	resp, err := c.post(ctx, ReportPath, Request{MAC: c.MAC, UUID: c.UUID, Image: c.Image, Error: problem.Error()})
	if err != nil {
		c.Log.Warn("report the refused configuration", "err", err)
		return
	}
	resp.Body.Close()
}

func (c *Client) post(ctx context.Context, path string, r Request) (*http.Response, error) {
	b, err := json.Marshal(r)
	if err != nil {
		return nil, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, strings.TrimSuffix(c.ConfigURL, "/")+path, bytes.NewReader(b))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.HTTP.Do(req)
	if errors.Is(err, pki.ErrNotPinned) {
		// The generic message speaks of join tokens; here the pin is the
		// image's own CA.
		return nil, fmt.Errorf("%w (here: the boot service's certificate is not from the cluster CA built into this host image; rebuild the image with this cluster's CA, or boot from this cluster's boot service)", err)
	}
	return resp, err
}

// errorText is the error field of a JSON error answer, or the body.
func errorText(b []byte) string {
	var e struct {
		Error string `json:"error"`
	}
	if json.Unmarshal(b, &e) == nil && e.Error != "" {
		return e.Error
	}
	if len(b) > 200 {
		b = b[:200]
	}
	return strings.TrimSpace(string(b))
}

// FetchFile gets url into dst (atomically), if its content has sha256 sum
// (hex): over plain HTTP (what iPXE and the boot service speak), so the
// sum, from the image itself, is what vouches for it. It asks again a few
// times before it gives up.
func FetchFile(ctx context.Context, hc *http.Client, url, sum, dst string) error {
	var last error
	for attempt := 0; attempt < 5; attempt++ {
		if attempt > 0 {
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(time.Duration(attempt) * 300 * time.Millisecond):
			}
		}
		if last = fetchOnce(ctx, hc, url, sum, dst); last == nil {
			return nil
		}
	}
	return last
}

func fetchOnce(ctx context.Context, hc *http.Client, url, sum, dst string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	f, err := os.CreateTemp(filepath.Dir(dst), ".fetch-*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	h := sha256.New()
	if _, err := io.Copy(io.MultiWriter(f, h), io.LimitReader(resp.Body, 1<<30)); err != nil {
		f.Close()
		return fmt.Errorf("GET %s: %w", url, err)
	}
	if err := f.Close(); err != nil {
		return err
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != strings.ToLower(strings.TrimSpace(sum)) {
		return fmt.Errorf("GET %s: its sha256 is %s, the image says %s: not used", url, got, strings.TrimSpace(sum))
	}
	if err := os.Chmod(f.Name(), 0o644); err != nil {
		return err
	}
	return os.Rename(f.Name(), dst)
}
