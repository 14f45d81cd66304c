package cli

import (
	"fmt"
	"io"
	"strconv"

	"github.com/spf13/cobra"

	"github.com/vigil-project/vigil/api"
)

func newBootRuleCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "rule", Short: "Boot rules: admit machines that boot by MAC, UUID or vendor, with a profile (as Auto Deploy)"}
	cmd.AddCommand(newBootRuleCreateCmd(g), newBootRuleListCmd(g), newBootRuleDeleteCmd(g))
	return cmd
}

func newBootRuleCreateCmd(g *globals) *cobra.Command {
	var r api.BootRule
	c := &cobra.Command{
		Use:   "create NAME (--mac MAC|PREFIX* | --uuid UUID | --vendor VENDOR) --profile PROFILE [--host-name NAME | --host-prefix PREFIX] [--rank N]",
		Short: "Create or replace a rule: a quarantined machine that matches it is admitted at its next request",
		Long: `Create or replace a boot rule. Rules are tried by rank (lowest first); the first
whose matchers all match a quarantined machine admits it with its profile.
A machine an operator quarantined ('vigil boot quarantine') stays quarantined
until an operator admits it. --host-name names the one machine an exact --mac
or --uuid matches; otherwise hosts are named PREFIX-XXXXXX (the profile's name
by default, and the MAC's last three bytes).
MAC, UUID and vendor are what a machine says of itself: anyone on the boot
network can claim them. A rule trusts the boot network as far as it admits.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			r.Name = args[0]
			out, err := g.client().SetBootRule(cmd.Context(), r)
			if err != nil {
				return err
			}
			return g.printValue(out, func(w io.Writer) {
				row(w, "RULE:", out.Name)
				row(w, "RANK:", out.Rank)
				row(w, "MATCHES:", ruleMatchers(out))
				row(w, "PROFILE:", out.Profile)
				row(w, "HOST NAME:", ruleNaming(out))
			})
		},
	}
	f := c.Flags()
	f.StringVar(&r.MAC, "mac", "", "a MAC address, or leading bytes then * (52:54:00:*)")
	f.StringVar(&r.UUID, "uuid", "", "the machine's SMBIOS UUID")
	f.StringVar(&r.Vendor, "vendor", "", "the SMBIOS manufacturer (compared without case)")
	f.StringVar(&r.Profile, "profile", "", "the boot profile admitted machines get")
	f.StringVar(&r.HostName, "host-name", "", "the host name of the one machine an exact --mac or --uuid matches")
	f.StringVar(&r.HostPrefix, "host-prefix", "", "hosts are named PREFIX-XXXXXX (default: the profile's name)")
	f.IntVar(&r.Rank, "rank", 0, "lower is tried first (default: after the existing rules)")
	c.MarkFlagRequired("profile")
	return c
}

func ruleMatchers(r api.BootRule) string {
	s := ""
	add := func(k, v string) {
		if v != "" {
			if s != "" {
				s += " and "
			}
			s += k + "=" + strconv.Quote(v)
		}
	}
	add("mac", r.MAC)
	add("uuid", r.UUID)
	add("vendor", r.Vendor)
	return s
}

func ruleNaming(r api.BootRule) string {
	switch {
	case r.HostName != "":
		return r.HostName
	case r.HostPrefix != "":
		return r.HostPrefix + "-XXXXXX"
	}
	return r.Profile + "-XXXXXX"
}

func newBootRuleListCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use: "list", Aliases: []string{"ls"}, Short: "List boot rules in the order they are tried", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			rs, err := g.client().BootRules(cmd.Context())
			if err != nil {
				return err
			}
			return g.printValue(rs, func(w io.Writer) {
				row(w, "RANK", "NAME", "MATCHES", "PROFILE", "HOST NAME")
				for _, r := range rs {
					row(w, r.Rank, r.Name, ruleMatchers(r), r.Profile, ruleNaming(r))
				}
			})
		},
	}
}

func newBootRuleDeleteCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use: "delete NAME", Aliases: []string{"rm"}, Short: "Delete a boot rule (machines it admitted stay admitted)", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := g.client().DeleteBootRule(cmd.Context(), args[0]); err != nil {
				return err
			}
			if !g.quiet {
				fmt.Fprintf(g.out, "rule %s deleted\n", args[0])
			}
			return nil
		},
	}
}
