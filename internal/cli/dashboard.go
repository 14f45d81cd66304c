package cli

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net/url"
	"os"
	"strings"

	"github.com/spf13/cobra"
)

func newDashboardCmd(g *globals) *cobra.Command {
	var caOut string
	var noToken bool
	cmd := &cobra.Command{
		Use:   "dashboard",
		Short: "Print the web dashboard's address, with a link that signs in with your token",
		Long: `Print the address of the web dashboard every manager serves at /ui/. The link carries your
token in its fragment (after '#'), which browsers never send to a server; the page keeps it for
the tab only and drops it from the address bar. Anyone who sees the link can act with your token:
use --no-token to print the address alone and paste a token on the sign-in page instead (make a
viewer one with 'vigil token create NAME --role viewer').

The manager's certificate is signed by the cluster's own CA, which a browser does not know: it
warns once. Compare the fingerprint printed here with the one it shows, or import the CA
(--ca-out FILE writes it) into the browser's authorities.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := g.loadConfig()
			if err != nil {
				return err
			}
			u, err := url.Parse(cfg.URL)
			if err != nil || u.Host == "" {
				return fmt.Errorf("the configuration's API address %q is not a URL: fix it or give --addr https://HOST:PORT", cfg.URL)
			}
			u.Path, u.RawQuery, u.Fragment = "/ui/", "", ""
			link := u.String()
			if !noToken {
				if cfg.Token == "" {
					return fmt.Errorf("the configuration has no token: give --no-token and sign in on the page")
				}
				link += "#token=" + url.QueryEscape(cfg.Token)
			}
			fmt.Fprintln(g.out, link)
			if g.quiet || cfg.CACert == "" {
				return nil
			}
			if caOut != "" {
				if err := os.WriteFile(caOut, []byte(cfg.CACert), 0o644); err != nil {
					return fmt.Errorf("write the CA certificate: %w", err)
				}
				fmt.Fprintf(g.errOut, "The cluster CA is in %s: import it into the browser's certificate authorities.\n", caOut)
			}
			if fp, err := caFingerprint(cfg.CACert); err == nil {
				fmt.Fprintf(g.errOut, "The manager's certificate is signed by the cluster CA with SHA-256 fingerprint\n  %s\n", fp)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&caOut, "ca-out", "", "also write the cluster CA's certificate (PEM) to this file, to import into a browser")
	cmd.Flags().BoolVar(&noToken, "no-token", false, "print the address without the token")
	return cmd
}

// caFingerprint is the SHA-256 of the CA certificate, as browsers show it.
func caFingerprint(pemText string) (string, error) {
	b, _ := pem.Decode([]byte(pemText))
	if b == nil {
		return "", fmt.Errorf("no PEM block")
	}
	if _, err := x509.ParseCertificate(b.Bytes); err != nil {
		return "", err
	}
	sum := sha256.Sum256(b.Bytes)
	parts := make([]string, len(sum))
	for i, c := range sum {
		parts[i] = fmt.Sprintf("%02X", c)
	}
	return strings.Join(parts, ":"), nil
}
