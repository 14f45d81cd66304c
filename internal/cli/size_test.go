package cli

import "testing"

func TestParseSize(t *testing.T) {
	tests := []struct {
		in      string
		want    int64
		wantErr bool
	}{
		{"128M", 128 << 20, false},
		{"128MiB", 128 << 20, false},
		{"128mb", 128 << 20, false},
		{"1G", 1 << 30, false},
		{"1.5G", 3 << 29, false},
		{"512K", 512 << 10, false},
		{"4096", 4096, false},
		{"2T", 2 << 40, false},
		{"", 0, true},
		{"abc", 0, true},
		{"-1G", 0, true},
		{"12X", 0, true},
		{"99999999999T", 0, true},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := parseSize(tt.in)
			if (err != nil) != tt.wantErr {
				t.Fatalf("parseSize(%q) err = %v, wantErr %v", tt.in, err, tt.wantErr)
			}
			if got != tt.want {
				t.Fatalf("parseSize(%q) = %d, want %d", tt.in, got, tt.want)
			}
		})
	}
}

func TestHumanSize(t *testing.T) {
	tests := []struct {
		in   int64
		want string
	}{
		{128 << 20, "128M"}, {1 << 30, "1G"}, {3 << 29, "1.5G"}, {100, "100"},
	}
	for _, tt := range tests {
		if got := humanSize(tt.in); got != tt.want {
			t.Fatalf("humanSize(%d) = %q, want %q", tt.in, got, tt.want)
		}
	}
}
