package qemu

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

func TestDiskInUse(t *testing.T) {
	path := filepath.Join(t.TempDir(), "disk.qcow2")
	if err := os.WriteFile(path, make([]byte, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name   string
		lockAt int64 // -1: no lock
		want   bool
	}{
		{"free", -1, false},
		{"permission byte held", 101, true},
		{"shared byte held", 203, true},
		{"unrelated byte", 10, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.lockAt >= 0 {
				// Another open file description, as another QEMU would have.
				f, err := os.Open(path)
				if err != nil {
					t.Fatal(err)
				}
				defer f.Close()
				lk := unix.Flock_t{Type: unix.F_RDLCK, Start: tt.lockAt, Len: 1}
				if err := unix.FcntlFlock(f.Fd(), unix.F_OFD_SETLK, &lk); err != nil {
					t.Fatal(err)
				}
			}
			got, err := DiskInUse(path)
			if err != nil {
				t.Fatal(err)
			}
			if got != tt.want {
				t.Fatalf("DiskInUse = %v, want %v", got, tt.want)
			}
		})
	}
	if _, err := DiskInUse(filepath.Join(t.TempDir(), "missing")); err == nil {
		t.Fatal("no error for a missing image")
	}
}
