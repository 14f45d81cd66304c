package cli

import (
	"bytes"
	"strings"
	"testing"

	"github.com/spf13/cobra"
)

// runRoot runs a fresh command tree with args and returns its error and
// what it wrote to stdout. Nothing here may reach a server: the address
// points at a port nobody listens on, so a stray call fails instead of
// talking to a real manager.
func runRoot(t *testing.T, args ...string) (string, error) {
	t.Helper()
	t.Setenv("VIGIL_ADDR", "http://127.0.0.1:1")
	root := NewRoot()
	var out, errOut bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&errOut)
	root.SetArgs(args)
	err := root.Execute()
	return out.String(), err
}

func TestUnknownSubcommandFails(t *testing.T) {
	tests := []struct {
		args    []string
		unknown string // the name the error must quote
		path    string // the group the error must name
		valid   string // one valid subcommand the error must list
	}{
		{[]string{"vm", "frobnicate"}, "frobnicate", "vigil vm", "create"},
		{[]string{"host", "frob"}, "frob", "vigil host", "list"},
		{[]string{"snapshot", "frob"}, "frob", "vigil snapshot", "revert"},
		{[]string{"snap", "frob"}, "frob", "vigil snapshot", "revert"},
		{[]string{"image", "frobnicate", "x"}, "frobnicate", "vigil image", "import"},
		{[]string{"completion", "frob"}, "frob", "vigil completion", "bash"},
		{[]string{"frob"}, "frob", "vigil", "vm"},
		{[]string{"-o", "json", "vm", "frobnicate"}, "frobnicate", "vigil vm", "list"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			out, err := runRoot(t, tt.args...)
			if err == nil {
				t.Fatalf("no error; printed:\n%s", out)
			}
			msg := err.Error()
			for _, want := range []string{`unknown command "` + tt.unknown + `"`, `for "` + tt.path + `"`, "valid commands are ", tt.valid} {
				if !strings.Contains(msg, want) {
					t.Errorf("error %q does not contain %q", msg, want)
				}
			}
			if strings.Contains(msg, "\n") {
				t.Errorf("error is not one line: %q", msg)
			}
		})
	}
}

func TestUnknownSubcommandListsOnlyVisibleCommands(t *testing.T) {
	_, err := runRoot(t, "vm", "frobnicate")
	if err == nil {
		t.Fatal("no error")
	}
	root := NewRoot()
	vm, _, ferr := root.Find([]string{"vm"})
	if ferr != nil {
		t.Fatal(ferr)
	}
	_, list, _ := strings.Cut(err.Error(), "valid commands are ")
	got := strings.Split(list, ", ")
	var want []string
	for _, sub := range vm.Commands() {
		if sub.IsAvailableCommand() {
			want = append(want, sub.Name())
		}
	}
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Errorf("valid commands = %v, want %v", got, want)
	}
}

func TestGroupHelpStillWorks(t *testing.T) {
	tests := [][]string{
		{"vm"},
		{"vm", "--help"},
		{"vm", "-h"},
		{"host"},
		{"snapshot", "--help"},
		{"image"},
		{},
		{"--help"},
		{"help"},
		{"help", "vm"},
	}
	for _, args := range tests {
		t.Run(strings.Join(args, " "), func(t *testing.T) {
			out, err := runRoot(t, args...)
			if err != nil {
				t.Fatalf("error: %v", err)
			}
			if !strings.Contains(out, "Available Commands:") {
				t.Errorf("no help printed:\n%s", out)
			}
		})
	}
}

func TestCompletionStillListsSubcommands(t *testing.T) {
	out, err := runRoot(t, cobra.ShellCompRequestCmd, "vm", "")
	if err != nil {
		t.Fatalf("error: %v", err)
	}
	for _, want := range []string{"create", "list", "show"} {
		if !strings.Contains(out, want) {
			t.Errorf("completion output lacks %q:\n%s", want, out)
		}
	}
	out, err = runRoot(t, cobra.ShellCompRequestCmd, "")
	if err != nil {
		t.Fatalf("error: %v", err)
	}
	if !strings.Contains(out, "vm") || !strings.Contains(out, "snapshot") {
		t.Errorf("root completion lacks vm/snapshot:\n%s", out)
	}
}

// Every command group must carry the rule, so a group added later cannot
// slip back to printing help and exiting 0 on a typo.
func TestEveryGroupRejectsUnknownSubcommands(t *testing.T) {
	var walk func(c *cobra.Command)
	walk = func(c *cobra.Command) {
		if c.HasSubCommands() {
			if c.Args == nil || c.Args(c, []string{"frob"}) == nil {
				t.Errorf("%q accepts an unknown subcommand", c.CommandPath())
			}
		}
		for _, sub := range c.Commands() {
			walk(sub)
		}
	}
	walk(NewRoot())
}
