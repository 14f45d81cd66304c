package manager

import (
	"errors"
	"strings"
	"testing"

	"github.com/vigil-project/vigil/api"
)

func TestPlace(t *testing.T) {
	h := func(name, state string, memGiB int64, cpus int, enabled bool, usedGiB int64, usedCPUs int) candidate {
		return candidate{host: api.Host{Name: name, State: state, MemoryBytes: memGiB << 30, CPUs: cpus}, enabled: enabled,
			usedMemory: usedGiB << 30, usedCPUs: usedCPUs}
	}
	pooled := func(c candidate, pool string) candidate { c.host.StoragePool = pool; return c }
	tests := []struct {
		name    string
		cands   []candidate
		memGiB  int64
		cpus    int
		pin     string
		pool    string
		want    string
		wantErr error
		errSub  string
	}{
		{"most free memory wins", []candidate{h("a", "up", 8, 4, true, 6, 2), h("b", "up", 8, 4, true, 2, 2)}, 1, 1, "", "", "b", nil, ""},
		{"never more memory than the host has", []candidate{h("a", "up", 8, 4, true, 7, 0)}, 2, 1, "", "", "", ErrConflict, "a has 1GiB of memory unreserved"},
		{"cpu overcommit 4x", []candidate{h("a", "up", 64, 2, true, 0, 7)}, 1, 1, "", "", "a", nil, ""},
		{"cpu overcommit exhausted", []candidate{h("a", "up", 64, 2, true, 0, 8)}, 1, 1, "", "", "", ErrConflict, "a has 0 vCPUs unreserved"},
		{"down, dead and drained hosts are skipped", []candidate{h("a", "down", 64, 8, true, 0, 0), h("b", "up", 64, 8, false, 0, 0), h("d", "dead", 64, 8, true, 0, 0), h("c", "up", 4, 1, true, 0, 0)}, 1, 1, "", "", "c", nil, ""},
		{"nothing fits names every reason", []candidate{h("a", "down", 64, 8, true, 0, 0), h("b", "up", 64, 8, false, 0, 0)}, 1, 1, "", "", "", ErrConflict, "a is down; b is drained"},
		{"pin", []candidate{h("a", "up", 64, 8, true, 0, 0), h("b", "up", 8, 8, true, 0, 0)}, 1, 1, "b", "", "b", nil, ""},
		{"pin to a full host", []candidate{h("a", "up", 64, 8, true, 0, 0), h("b", "up", 8, 8, true, 8, 0)}, 1, 1, "b", "", "", ErrConflict, "b has 0B"},
		{"pin to an unknown host", []candidate{h("a", "up", 64, 8, true, 0, 0)}, 1, 1, "zz", "", "", ErrInvalid, "no host named zz"},
		{"no hosts", nil, 1, 1, "", "", "", ErrUnavailable, "no hosts"},
		{"only hosts of the vm's pool", []candidate{h("a", "up", 64, 8, true, 0, 0), pooled(h("b", "up", 8, 8, true, 0, 0), "p1")}, 1, 1, "", "p1", "b", nil, ""},
		{"no host of the vm's pool", []candidate{pooled(h("a", "up", 64, 8, true, 0, 0), "p2")}, 1, 1, "", "p1", "", ErrConflict, "a does not mount storage pool p1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := place(tt.cands, need{mem: tt.memGiB << 30, cpus: tt.cpus, pin: tt.pin, pool: tt.pool}, DefaultOvercommit)
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) || !strings.Contains(err.Error(), tt.errSub) {
					t.Fatalf("err = %v, want %v containing %q", err, tt.wantErr, tt.errSub)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("place = %q, %v; want %q", got, err, tt.want)
			}
		})
	}
}
