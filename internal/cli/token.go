package cli

import (
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/vigil-project/vigil/api"
)

func newTokenCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "token", Short: "Manage API tokens (admin): create, list, revoke"}
	var role string
	var ttl time.Duration
	create := &cobra.Command{
		Use:   "create NAME",
		Short: "Make an API token with a role; it is printed once (the last line)",
		Long: `Make an API token. Roles: viewer (read, events, metrics), operator (VM lifecycle, snapshots,
exec, migrate, drain), admin (everything, tokens and join tokens included). The token is shown
this once: only its hash is kept.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if ttl < 0 {
				return fmt.Errorf("--ttl %s is negative", ttl)
			}
			t, err := g.client().CreateToken(cmd.Context(), api.TokenCreateRequest{Name: args[0], Role: role, TTLSeconds: int64(ttl.Seconds())})
			if err != nil {
				return err
			}
			if !g.quiet {
				exp := "never expires"
				if t.Info.Expires != nil {
					exp = "expires " + t.Info.Expires.Local().Format(time.DateTime)
				}
				fmt.Fprintf(g.out, "Token %s (%s, %s); keep it, it is not shown again:\n", t.Info.Name, t.Info.Role, exp)
			}
			fmt.Fprintln(g.out, t.Token)
			return nil
		},
	}
	create.Flags().StringVar(&role, "role", "viewer", "viewer, operator or admin")
	create.Flags().DurationVar(&ttl, "ttl", 0, "how long the token works (e.g. 720h); 0 = until revoked")
	list := &cobra.Command{
		Use:   "list",
		Short: "List the API tokens (never their secrets)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ts, err := g.client().Tokens(cmd.Context())
			if err != nil {
				return err
			}
			return g.printValue(ts, func(w io.Writer) {
				row(w, "NAME", "ROLE", "CREATED", "EXPIRES", "BY")
				for _, t := range ts {
					exp := "never"
					if t.Expires != nil {
						exp = t.Expires.Local().Format(time.DateTime)
					}
					row(w, t.Name, t.Role, t.Created.Local().Format(time.DateTime), exp, t.CreatedBy)
				}
			})
		},
	}
	revoke := &cobra.Command{
		Use:   "revoke NAME",
		Short: "Revoke an API token: it stops working at once",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.client().RevokeToken(cmd.Context(), args[0])
		},
	}
	cmd.AddCommand(create, list, revoke)
	return cmd
}

func newAuditCmd(g *globals) *cobra.Command {
	var follow bool
	var limit int
	cmd := &cobra.Command{
		Use:   "audit",
		Short: "Show who did what, when, and the result (--follow streams new entries)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			c := g.client()
			print := func(e api.AuditEntry) {
				if g.output == "json" {
					g.printValue(e, nil)
					return
				}
				res := fmt.Sprint(e.Status)
				if e.Error != "" {
					res += " " + e.Error
				}
				fmt.Fprintf(g.out, "%s %-22s %-40s %s\n", e.Time.Local().Format(time.DateTime), e.Actor, e.Action, strings.TrimSpace(res))
			}
			if !follow {
				es, err := c.Audit(cmd.Context(), limit)
				if err != nil {
					return err
				}
				if g.output != "table" {
					return g.printValue(es, nil)
				}
				for _, e := range es {
					print(e)
				}
				return nil
			}
			s, err := c.Events(cmd.Context(), 0, "", true)
			if err != nil {
				return err
			}
			defer s.Close()
			for {
				e, err := s.Next()
				if err != nil || cmd.Context().Err() != nil {
					return nil
				}
				if e.Type == "audit" && e.Audit != nil {
					print(*e.Audit)
				}
			}
		},
	}
	cmd.Flags().BoolVarP(&follow, "follow", "f", false, "stream new entries as they happen")
	cmd.Flags().IntVar(&limit, "limit", 100, "how many of the latest entries")
	return cmd
}

func newAPICmd(g *globals) *cobra.Command {
	var data string
	cmd := &cobra.Command{
		Use:   "api METHOD PATH",
		Short: "Make an authenticated raw API call and print the answer's body (like gh api)",
		Long: `Make an authenticated call to the API, e.g. 'vigil api GET /v1/vms' or
'vigil api PUT /v1/vms/web1/state -d '{"action":"pause"}''. The body of the answer is printed;
on a 4xx or 5xx answer 'HTTP <code>' is printed on stderr and the exit code is 1.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			method := strings.ToUpper(args[0])
			path := args[1]
			if !strings.HasPrefix(path, "/") {
				path = "/" + path
			}
			var body io.Reader
			if data != "" {
				body = strings.NewReader(data)
			}
			code, b, err := g.client().Raw(cmd.Context(), method, path, body)
			if err != nil {
				return err
			}
			g.out.Write(b)
			if len(b) > 0 && b[len(b)-1] != '\n' {
				fmt.Fprintln(g.out)
			}
			if code >= 400 {
				return fmt.Errorf("HTTP %d", code)
			}
			return nil
		},
	}
	cmd.Flags().StringVarP(&data, "data", "d", "", "the request body (JSON)")
	return cmd
}
