package hostagent

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vigil-project/vigil/internal/hostproto"
)

// TestStandbyExpiry: a standby no primary has streamed to for
// standbyExpiry goes, with its directory; a fresh one and one being
// streamed to stay; an unclaimed directory left by an earlier agent goes
// once old.
func TestStandbyExpiry(t *testing.T) {
	a := &Agent{cfg: Config{Name: "h2", DataDir: t.TempDir()}, log: slog.New(slog.DiscardHandler), vms: map[string]*vm{}}
	ctx := context.Background()
	for _, vm := range []string{"old", "fresh", "busy"} {
		if _, err := a.Standby(ctx, hostproto.StandbyRequest{VM: vm, Primary: "h1", Generation: 1}); err != nil {
			t.Fatal(err)
		}
	}
	orphan := filepath.Join(a.cfg.DataDir, "standby", "orphan")
	os.MkdirAll(orphan, 0o700)
	now := time.Now().Add(standbyExpiry + time.Minute)
	a.standbys["fresh"].heardAt = now.Add(-time.Minute)
	a.standbys["busy"].stream = nopCloser{}
	a.expireStandbysNow(now)
	for vm, want := range map[string]bool{"old": false, "fresh": true, "busy": true, "orphan": false} {
		_, kept := a.standbys[vm]
		_, err := os.Stat(a.standbyDir(vm))
		if vm != "orphan" && kept != want {
			t.Errorf("standby %s kept = %v, want %v", vm, kept, want)
		}
		if (err == nil) != want {
			t.Errorf("directory of %s kept = %v, want %v", vm, err == nil, want)
		}
	}
}

type nopCloser struct{}

func (nopCloser) Close() error { return nil }
