// Package testenv holds helpers shared by tests that drive real guests.
package testenv

import (
	"context"
	"fmt"
	"io"
	"net/http"
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
