package cli

import (
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
)

func newDashboardCmd(g *globals) *cobra.Command {
	var caOut string
	var noLink bool
	cmd := &cobra.Command{
		Use:   "dashboard",
		Short: "Print a link that signs in to the web dashboard (good once, for 2 minutes)",
		Long: `Print a link to the web dashboard every manager serves at /ui/. The link carries a one-use
code (after '#', which browsers do not send to servers) that the page exchanges for a token of
its own, of your token's role, lasting 12 hours (or less if yours expires sooner); the link is
worthless once used or after 2 minutes. Open it in a browser that reaches the same manager.
With --no-link, only the address: sign in there by pasting a token.

The manager's certificate is signed by the cluster's own CA, which a browser does not know: it
warns. Import the CA (--ca-out FILE writes it) into the browser's authorities, or check that the
certificate the browser shows has the fingerprint printed here (managers renew theirs daily).`,
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
			if !noLink {
				l, err := g.client().SignInLink(cmd.Context())
				if err != nil {
					return fmt.Errorf("ask for a sign-in link: %w", err)
				}
				link += "#code=" + url.QueryEscape(l.Code)
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
			if fp, err := serverFingerprint(u.Host, cfg.CACert); err == nil {
				fmt.Fprintf(g.errOut, "The manager's certificate (verified against the cluster CA) has the SHA-256 fingerprint\n  %s\n", fp)
			} else {
				fmt.Fprintf(g.errOut, "Could not verify the manager's certificate: %v\n", err)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&caOut, "ca-out", "", "also write the cluster CA's certificate (PEM) to this file, to import into a browser")
	cmd.Flags().BoolVar(&noLink, "no-link", false, "print the address only (sign in with a token on the page)")
	return cmd
}

// serverFingerprint connects to the manager, verifies its certificate
// against the CA, and returns the certificate's SHA-256 as browsers show it.
func serverFingerprint(hostport, caPEM string) (string, error) {
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM([]byte(caPEM)) {
		return "", fmt.Errorf("the configuration's CA is not a PEM certificate")
	}
	host, _, err := net.SplitHostPort(hostport)
	if err != nil {
		return "", err
	}
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", hostport,
		&tls.Config{RootCAs: pool, ServerName: host, MinVersion: tls.VersionTLS13})
	if err != nil {
		return "", err
	}
	defer conn.Close()
	sum := sha256.Sum256(conn.ConnectionState().PeerCertificates[0].Raw)
	parts := make([]string, len(sum))
	for i, c := range sum {
		parts[i] = fmt.Sprintf("%02X", c)
	}
	return strings.Join(parts, ":"), nil
}
