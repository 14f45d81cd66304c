// Package cli implements the vigil command line: one file per noun.
package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/vigil-project/vigil/client"
)

// globals are the persistent flags every command shares.
type globals struct {
	addr   string
	config string
	output string
	quiet  bool
	out    io.Writer
	errOut io.Writer
}

// client is the API client the configuration describes; if it cannot be
// loaded, every call fails with the reason.
func (g *globals) client() *client.Client {
	cfg, err := g.loadConfig()
	if err != nil {
		return client.Unusable(err)
	}
	c, err := client.NewFromConfig(cfg)
	if err != nil {
		return client.Unusable(err)
	}
	return c
}

// loadConfig finds how to reach the API: --config FILE or VIGIL_CONFIG;
// else VIGIL_ADDR with VIGIL_TOKEN and VIGIL_CACERT (a PEM file); else the
// user's default file (written by 'vigil agent --dev'). --addr overrides
// the URL of any of them.
func (g *globals) loadConfig() (client.Config, error) {
	var cfg client.Config
	var err error
	switch {
	case g.config != "":
		cfg, err = client.LoadConfig(g.config)
	case os.Getenv("VIGIL_ADDR") != "" || os.Getenv("VIGIL_TOKEN") != "":
		cfg = client.Config{URL: os.Getenv("VIGIL_ADDR"), Token: os.Getenv("VIGIL_TOKEN")}
		if cfg.URL == "" {
			cfg.URL = client.DefaultAddr
		}
		if p := os.Getenv("VIGIL_CACERT"); p != "" {
			b, rerr := os.ReadFile(p)
			if rerr != nil {
				return cfg, fmt.Errorf("VIGIL_CACERT: %w", rerr)
			}
			cfg.CACert = string(b)
		}
	default:
		path := client.DefaultConfigPath()
		cfg, err = client.LoadConfig(path)
		if errors.Is(err, fs.ErrNotExist) {
			return cfg, fmt.Errorf("no vigil configuration: start 'vigil agent --dev' (it writes %s), or give --config FILE (an agent's DATA_DIR/client.yaml), or set VIGIL_ADDR, VIGIL_TOKEN and VIGIL_CACERT", path)
		}
	}
	if err != nil {
		return cfg, err
	}
	if g.addr != "" {
		cfg.URL = g.addr
	}
	return cfg, nil
}

// NewRoot builds the vigil command tree.
func NewRoot() *cobra.Command {
	g := &globals{}
	root := &cobra.Command{
		Use:           "vigil",
		Short:         "Vigil runs virtual servers on QEMU and keeps them alive and their state safe",
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, args []string) error {
			g.out, g.errOut = cmd.OutOrStdout(), cmd.ErrOrStderr()
			switch g.output {
			case "table", "json", "yaml":
			default:
				return fmt.Errorf("unknown output format %q: use table, json or yaml", g.output)
			}
			return nil
		},
	}
	root.PersistentFlags().StringVar(&g.addr, "addr", "", "URL of the vigil API, overriding the configuration's (https://HOST:PORT)")
	root.PersistentFlags().StringVar(&g.config, "config", os.Getenv("VIGIL_CONFIG"), "the CLI configuration: API URL, CA certificate, token (env VIGIL_CONFIG; default "+client.DefaultConfigPath()+")")
	root.PersistentFlags().StringVarP(&g.output, "output", "o", "table", "output format: table, json or yaml")
	root.PersistentFlags().BoolVarP(&g.quiet, "quiet", "q", false, "print only what scripts need")
	root.AddCommand(newVMCmd(g), newSnapshotCmd(g), newHostCmd(g), newEventsCmd(g), newImageCmd(g), newNetworkCmd(g), newBootCmd(g), newAgentCmd(g),
		newTokenCmd(g), newAuditCmd(g), newAPICmd(g), newDashboardCmd(g))
	// cobra adds its "completion" group lazily on Execute; add it now so the
	// walk below covers it too (it is a no-op if it already exists).
	root.InitDefaultCompletionCmd()
	requireKnownSubcommands(root)
	return root
}

// requireKnownSubcommands makes every command group in the tree under c (a
// command with subcommands and no Run of its own, c included) fail on an
// unknown subcommand. cobra prints a group's help and returns no error
// whatever arguments follow it, so "vigil vm frobnicate" would exit 0. A
// group called with no arguments still prints its help and succeeds.
func requireKnownSubcommands(c *cobra.Command) {
	if c.HasSubCommands() && !c.Runnable() {
		c.Args = unknownSubcommand
		c.RunE = func(cmd *cobra.Command, args []string) error { return cmd.Help() }
	}
	for _, sub := range c.Commands() {
		requireKnownSubcommands(sub)
	}
}

// unknownSubcommand is the Args check of a command group: any positional
// argument left over is a subcommand that does not exist.
func unknownSubcommand(cmd *cobra.Command, args []string) error {
	if len(args) == 0 {
		return nil
	}
	var valid []string
	for _, sub := range cmd.Commands() {
		if sub.IsAvailableCommand() {
			valid = append(valid, sub.Name())
		}
	}
	return fmt.Errorf("unknown command %q for %q: valid commands are %s",
		args[0], cmd.CommandPath(), strings.Join(valid, ", "))
}

// Main runs the CLI and returns the process exit code. Errors are printed as
// one line: what went wrong and what to do.
func Main(ctx context.Context, args []string) int {
	root := NewRoot()
	root.SetArgs(args)
	if err := root.ExecuteContext(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "vigil: "+err.Error())
		return 1
	}
	return 0
}
