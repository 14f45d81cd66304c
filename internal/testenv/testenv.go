// Package testenv holds helpers shared by tests that drive real guests.
package testenv

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// HTTPGet fetches url until it answers 200 (a guest's web server may need
// a moment after boot or a move) and returns the body; it fails the test
// after 5 s.
func HTTPGet(ctx context.Context, t testing.TB, url string) string {
	t.Helper()
	client := &http.Client{Timeout: 5 * time.Second}
	var lastErr error
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			t.Fatal(err)
		}
		resp, err := client.Do(req)
		if err != nil {
			lastErr = err
			continue
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err == nil && resp.StatusCode == http.StatusOK {
			return string(b)
		}
		lastErr = fmt.Errorf("status %s, read error %v", resp.Status, err)
	}
	t.Fatalf("GET %s: %v", url, lastErr)
	return ""
}

// NeedProgram returns the path of program, looked up in PATH and then in
// the sbin directories. Missing, it skips the test on a developer's
// machine but fails it in CI (CI=true), where .ci/run must have installed
// Debian package pkg: a skip there would hide a missing install step.
func NeedProgram(t testing.TB, program, pkg string) string {
	t.Helper()
	if p, err := exec.LookPath(program); err == nil {
		return p
	}
	for _, dir := range []string{"/usr/sbin", "/sbin"} {
		if p := filepath.Join(dir, program); isExecutable(p) {
			return p
		}
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("%s is not installed in CI: add Debian package %s to .ci/run", program, pkg)
	}
	t.Skipf("%s not installed (Debian package %s)", program, pkg)
	return ""
}

func isExecutable(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0
}
