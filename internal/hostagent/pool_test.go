package hostagent

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vigil-project/vigil/internal/hostproto"
)

// TestPoolOwnership covers the lease on a pooled VM: the creating host owns
// it, another host of the pool takes it over with a later epoch, and from
// then on the first one can neither start it nor keep it.
func TestPoolOwnership(t *testing.T) {
	pool := t.TempDir()
	a1 := newTestAgent(t)
	a1.cfg.StoragePool = pool
	id, err := openPool(pool)
	if err != nil {
		t.Fatal(err)
	}
	a1.poolID = id
	a2 := newTestAgent(t)
	a2.cfg.Name, a2.cfg.StoragePool = "h2", pool
	if a2.poolID, err = openPool(pool); err != nil || a2.poolID != id {
		t.Fatalf("second host reads pool id %q, %v; want %q", a2.poolID, err, id)
	}
	ctx := context.Background()
	s := spec("db", 64<<20)
	s.Pool, s.Epoch = id, 1
	if _, err := a1.Create(ctx, hostproto.CreateRequest{Spec: s}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(pool, "vms", "db", "disk.qcow2")); err != nil {
		t.Fatalf("disk not in the pool: %v", err)
	}
	v1, _ := a1.get("db")
	if err := v1.checkOwner(); err != nil {
		t.Fatalf("creator does not own it: %v", err)
	}

	tests := []struct {
		name    string
		epoch   int64
		pool    string
		wantErr string
	}{
		{"same epoch is no takeover", 0, id, ""},
		{"wrong pool", 2, "pool-other", "storage pool is not mounted"},
		{"later epoch takes over", 2, id, ""},
		{"an older epoch cannot take it back", 1, id, "holds epoch 2"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.epoch == 0 {
				if stale, _ := v1.stale(); stale {
					t.Fatal("creator's copy counted stale before any takeover")
				}
				return
			}
			s2 := s
			s2.Epoch, s2.Pool = tt.epoch, tt.pool
			_, err := a2.Attach(ctx, s2)
			if tt.wantErr == "" && err != nil || tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)) {
				t.Fatalf("attach: %v, want %q", err, tt.wantErr)
			}
		})
	}
	if err := v1.checkOwner(); !errors.Is(err, ErrNotOwner) {
		t.Fatalf("old owner may still start it: %v", err)
	}
	if _, err := a1.Start(ctx, hostproto.VMRef{VM: "db"}); !errors.Is(err, ErrNotOwner) {
		t.Fatalf("old owner's start: %v, want ErrNotOwner", err)
	}
	if _, err := a1.Delete(ctx, hostproto.VMRef{VM: "db"}); !errors.Is(err, ErrNotOwner) {
		t.Fatalf("old owner deleted the pool's files: %v", err)
	}
	a1.Sweep()
	if _, err := a1.get("db"); !errors.Is(err, ErrUnknownVM) {
		t.Fatalf("sweep kept the stale vm: %v", err)
	}
	if _, err := os.Stat(filepath.Join(pool, "vms", "db", "disk.qcow2")); err != nil {
		t.Fatalf("sweep touched the pool: %v", err)
	}
	if _, err := a2.Delete(ctx, hostproto.VMRef{VM: "db"}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(pool, "vms", "db")); !os.IsNotExist(err) {
		t.Fatalf("owner's delete left files in the pool: %v", err)
	}
}
