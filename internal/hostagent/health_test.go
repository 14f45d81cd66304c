package hostagent

import "testing"

func TestStatCPUTicks(t *testing.T) {
	tests := []struct {
		line string
		want int64
	}{
		{"1234 (qemu-system-x86) S 1 2 3 4 5 6 7 8 9 10 150 25 0 0 20 0 1 0", 175},
		{"99 (CPU 0/TCG) R 1 2 3 4 5 6 7 8 9 10 3 4 0 0", 7},
		{"99 (weird) name)) R 1 2 3 4 5 6 7 8 9 10 1 1 0 0", 2},
		{"garbage", 0},
		{"1 (x) S 1 2", 0},
	}
	for _, tt := range tests {
		if got := statCPUTicks([]byte(tt.line)); got != tt.want {
			t.Fatalf("statCPUTicks(%q) = %d, want %d", tt.line, got, tt.want)
		}
	}
}
