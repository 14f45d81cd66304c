package integration

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestBadInputs checks that each mistake gets a one-line error, a non-zero
// exit, and changes nothing.
func TestBadInputs(t *testing.T) {
	needIntegration(t)
	a := newDevAgent(t)
	a.mustVigil("vm", "create", "web1")

	tests := []struct {
		name string
		args []string
		want string
	}{
		{"invalid name", []string{"vm", "create", "Bad_Name"}, "DNS label"},
		{"zero memory", []string{"vm", "create", "a", "--memory", "0"}, "too small"},
		{"absurd memory", []string{"vm", "create", "a", "--memory", "64T"}, "more than the host has"},
		{"zero cpus", []string{"vm", "create", "a", "--cpus", "0"}, "at least 1"},
		{"absurd cpus", []string{"vm", "create", "a", "--cpus", "100000"}, "more than allowed"},
		{"zero disk", []string{"vm", "create", "a", "--disk", "0"}, "too small"},
		{"unparsable size", []string{"vm", "create", "a", "--memory", "lots"}, "invalid size"},
		{"duplicate name", []string{"vm", "create", "web1"}, "already exists"},
		{"unknown vm", []string{"vm", "show", "nope"}, "does not exist"},
		{"start unknown vm", []string{"vm", "start", "nope"}, "does not exist"},
		{"stop a stopped vm", []string{"vm", "stop", "web1"}, "already stopped"},
		{"wait without start", []string{"vm", "create", "a", "--wait"}, "--wait needs --start"},
		{"bad output format", []string{"vm", "list", "-o", "xml"}, "unknown output format"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, errs, code := a.vigil(tt.args...)
			if code == 0 {
				t.Fatalf("exit 0, want failure")
			}
			if !strings.Contains(errs, tt.want) {
				t.Fatalf("stderr %q does not contain %q", errs, tt.want)
			}
			if n := strings.Count(strings.TrimSpace(errs), "\n"); n != 0 {
				t.Fatalf("error is %d lines, want one: %q", n+1, errs)
			}
		})
	}
	if list := a.mustVigil("vm", "list", "-q"); strings.TrimSpace(list) != "web1" {
		t.Fatalf("bad inputs changed the VM list: %q", list)
	}
	entries, _ := os.ReadDir(filepath.Join(a.dataDir, "host", "vms"))
	if len(entries) != 1 {
		t.Fatalf("bad inputs left %d vm directories, want 1", len(entries))
	}
}

// TestAgentRefusesWithoutQEMU runs the agent with a PATH that has no QEMU.
func TestAgentRefusesWithoutQEMU(t *testing.T) {
	needIntegration(t)
	cmd := exec.Command(filepath.Join(binDir, "vigil"), "agent", "--dev", "--listen", freeAddr(t),
		"--data-dir", shortTempDir(t), "--image-dir", imageDir)
	cmd.Env = []string{"PATH=" + t.TempDir(), "HOME=" + t.TempDir()}
	out, err := cmd.CombinedOutput()
	if err == nil {
		t.Fatalf("agent started without qemu:\n%s", out)
	}
	if !strings.Contains(string(out), "qemu-system-x86_64 is not installed") || !strings.Contains(string(out), "apt-get install") {
		t.Fatalf("unclear error without qemu:\n%s", out)
	}
}

// TestAgentRefusesWithoutImage points the agent at an image it cannot build.
func TestAgentRefusesWithoutImage(t *testing.T) {
	needIntegration(t)
	cmd := exec.Command(filepath.Join(binDir, "vigil"), "agent", "--dev", "--listen", freeAddr(t),
		"--data-dir", shortTempDir(t), "--image-dir", filepath.Join(t.TempDir(), "img"),
		"--guest-agent", filepath.Join(t.TempDir(), "no-such-vigil-guest"))
	out, err := cmd.CombinedOutput()
	if err == nil {
		t.Fatalf("agent started without an image:\n%s", out)
	}
	if !strings.Contains(string(out), "guest agent binary") || !strings.Contains(string(out), "not found") {
		t.Fatalf("unclear error for an image that cannot be built:\n%s", out)
	}
}
