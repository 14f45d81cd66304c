package debkernel

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseDepends(t *testing.T) {
	tests := []struct {
		out  string
		want string
		ok   bool
	}{
		{"linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n", "linux-image-6.1.0-56-cloud-amd64", true},
		{"linux-image-cloud-amd64\n |Depends: linux-image-6.1.0-57-cloud-amd64\n  Depends: foo\n", "linux-image-6.1.0-57-cloud-amd64", true},
		{"linux-image-cloud-amd64\n  Depends: <linux-image-virtual>\n", "", false},
		{"", "", false},
	}
	for _, tc := range tests {
		got, ok := parseDepends([]byte(tc.out))
		if got != tc.want || ok != tc.ok {
			t.Errorf("%q: got (%q, %v), want (%q, %v)", tc.out, got, ok, tc.want, tc.ok)
		}
	}
}

func TestAptErrorsSayWhatToDo(t *testing.T) {
	noop := func(string, ...any) {}
	t.Setenv("PATH", t.TempDir()) // no apt tools at all
	if _, err := resolveKernelPackage(t.Context()); err == nil || !strings.Contains(err.Error(), "install apt") {
		t.Errorf("no apt-cache: got %v", err)
	}
	if _, err := fetchKernelDeb(t.Context(), "linux-image-x", t.TempDir(), noop); err == nil || !strings.Contains(err.Error(), "install apt") {
		t.Errorf("no apt-get: got %v", err)
	}

	// Failing tools: the error must point at apt-get update.
	bin := t.TempDir()
	for _, tool := range []string{"apt-cache", "apt-get"} {
		script := "#!/bin/sh\necho 'E: Unable to locate package' >&2\nexit 100\n"
		if err := os.WriteFile(filepath.Join(bin, tool), []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	t.Setenv("PATH", bin+":/bin:/usr/bin")
	if _, err := resolveKernelPackage(t.Context()); err == nil || !strings.Contains(err.Error(), "run apt-get update") {
		t.Errorf("failing apt-cache: got %v", err)
	}
	cache := t.TempDir()
	if _, err := fetchKernelDeb(t.Context(), "linux-image-x", cache, noop); err == nil || !strings.Contains(err.Error(), "run apt-get update") {
		t.Errorf("failing apt-get: got %v", err)
	}
	if left, _ := os.ReadDir(cache); len(left) != 0 {
		t.Errorf("failed download left %v in the cache", left)
	}

	// A cached package is used without calling apt-get.
	deb := filepath.Join(cache, "linux-image-x_1.0_amd64.deb")
	if err := os.WriteFile(deb, []byte("deb"), 0o644); err != nil {
		t.Fatal(err)
	}
	if got, err := fetchKernelDeb(t.Context(), "linux-image-x", cache, noop); err != nil || got != deb {
		t.Errorf("cached: got (%q, %v)", got, err)
	}
}
