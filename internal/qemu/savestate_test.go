package qemu

import (
	"context"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/vigil-project/vigil/internal/guestimage"
)

// TestSaveStateSwitchoverOnce saves a guest's memory with a switchover
// hook, stopped first as under TCG and live: the hook (a snapshot's disk
// freeze, which fails when run twice for one name) runs exactly once per
// save, however often QEMU still reports pre-switchover after
// migrate-continue was sent (seen in make bench: the second disk snapshot
// failed, "already exists").
func TestSaveStateSwitchoverOnce(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a real guest; skipped with -short")
	}
	imageDir := os.Getenv("VIGIL_TEST_IMAGE")
	if imageDir == "" {
		t.Skip("VIGIL_TEST_IMAGE is not set (make test sets it)")
	}
	img, err := guestimage.Load(imageDir)
	if err != nil {
		t.Skipf("no guest image: %v", err)
	}
	bin, err := FindBinary()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	dir, err := os.MkdirTemp("", "vss")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	disk := filepath.Join(dir, "disk.qcow2")
	if out, err := exec.CommandContext(ctx, "qemu-img", "create", "-q", "-f", "qcow2", disk, "256M").CombinedOutput(); err != nil {
		t.Fatalf("qemu-img: %v: %s", err, out)
	}
	accel, _ := ChooseAccel(AccelAuto)
	m := Machine{Name: "ss", UUID: "00000000-0000-4000-8000-000000000005", MemoryBytes: 128 << 20, CPUs: 1, Accel: accel,
		Kernel: img.Kernel, Initrd: img.Initrd, Cmdline: img.Cmdline + " vigil.name=ss", Disk: disk, HostPort: freeTCPPort(t), Dir: dir}
	p, err := Start(ctx, bin, m)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		kctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		p.Monitor.Close()
		p.Kill(kctx)
	})
	heartbeats(ctx, t, m.AgentSocket(), 1)
	// The race is between QEMU's migration thread and our next query: many
	// saves give it many chances.
	for i := range 20 {
		stopFirst := i%2 == 0
		if stopFirst {
			if err := p.Monitor.Stop(ctx); err != nil {
				t.Fatal(err)
			}
		}
		calls := 0
		_, err := SaveState(ctx, p.Monitor, dir, io.Discard, SaveOptions{AtSwitchover: func(ctx context.Context) error {
			calls++
			time.Sleep(5 * time.Millisecond) // as long as a disk snapshot takes
			return nil
		}})
		if err != nil {
			t.Fatalf("save %d: %v", i, err)
		}
		if calls != 1 {
			t.Fatalf("save %d (stopped first: %v): the switchover hook ran %d times", i, stopFirst, calls)
		}
		if err := p.Monitor.Cont(ctx); err != nil {
			t.Fatal(err)
		}
	}
}
