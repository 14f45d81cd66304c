package hostagent

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/vigil-project/vigil/internal/hostproto"
)

// TestColdBootDropsSavedState: a VM with a saved state that is booted from
// its disk instead (start, or a restart by crash recovery) must lose the
// state file, or a later resume would load old memory over a newer disk.
// A boot this host may not do leaves the file alone.
func TestColdBootDropsSavedState(t *testing.T) {
	tests := []struct {
		name      string
		boot      func(*Agent) error
		otherHost bool // the pool gives the VM to another host
		wantKept  bool
		wantErr   error
	}{
		{name: "start", boot: func(a *Agent) error {
			_, err := a.Start(context.Background(), hostproto.VMRef{VM: "web1"})
			return err
		}},
		{name: "restart", boot: func(a *Agent) error {
			_, err := a.Restart(context.Background(), hostproto.VMRef{VM: "web1"})
			return err
		}},
		{name: "refused start keeps it", otherHost: true, wantKept: true, wantErr: ErrNotOwner, boot: func(a *Agent) error {
			_, err := a.Start(context.Background(), hostproto.VMRef{VM: "web1"})
			return err
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, rec := newBareAgent(t)
			s := spec("web1", 64<<20)
			a.cfg.StoragePool, a.poolID = t.TempDir(), "pool-test"
			s.Pool, s.Epoch = "pool-test", 1
			v := a.newVM(s)
			a.vms["web1"] = v
			for _, dir := range []string{v.machine.Dir, v.storeDir} {
				if err := os.MkdirAll(dir, 0o755); err != nil {
					t.Fatal(err)
				}
			}
			// Not a real image: the launch fails later on, at QEMU.
			if err := os.WriteFile(v.machine.Disk, []byte("disk"), 0o644); err != nil {
				t.Fatal(err)
			}
			if err := v.writeOwner(1); err != nil {
				t.Fatal(err)
			}
			if tt.otherHost {
				a.cfg.Name = "h2" // writes as the other host would
				if err := v.writeOwner(2); err != nil {
					t.Fatal(err)
				}
				a.cfg.Name = "h1"
			}
			if err := os.WriteFile(v.stateFile(), []byte("old memory"), 0o644); err != nil {
				t.Fatal(err)
			}

			err := tt.boot(a)
			if err == nil {
				t.Fatal("the boot succeeded without qemu")
			}
			if tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
				t.Fatalf("boot: %v, want %v", err, tt.wantErr)
			}
			_, statErr := os.Stat(v.stateFile())
			if kept := statErr == nil; kept != tt.wantKept {
				t.Fatalf("state file kept = %v, want %v (boot error: %v)", kept, tt.wantKept, err)
			}
			if !tt.wantKept && rec.logged("saved state") == 0 {
				t.Fatal("dropping the saved state was not logged")
			}
			if _, err := os.Stat(filepath.Join(v.storeDir, "disk.qcow2")); err != nil {
				t.Fatalf("the disk went too: %v", err)
			}
		})
	}
}
