package qemu

import (
	"os"
	"path/filepath"
	"testing"
)

func TestChooseAccel(t *testing.T) {
	dir := t.TempDir()
	kvm := filepath.Join(dir, "kvm")
	os.WriteFile(kvm, nil, 0o600)
	withVMX := filepath.Join(dir, "vmx")
	os.WriteFile(withVMX, []byte("processor\t: 0\nflags\t\t: fpu vme vmx sse\n"), 0o600)
	without := filepath.Join(dir, "novmx")
	os.WriteFile(without, []byte("processor\t: 0\nflags\t\t: fpu vme sse hypervisor\n"), 0o600)
	missing := filepath.Join(dir, "missing")

	tests := []struct {
		name, mode, dev, cpuinfo, want string
		wantErr                        bool
	}{
		{"auto with kvm and vmx", "auto", kvm, withVMX, AccelKVM, false},
		{"auto nested: kvm without vmx", "auto", kvm, without, AccelTCG, false},
		{"auto without /dev/kvm", "auto", missing, withVMX, AccelTCG, false},
		{"empty means auto", "", missing, withVMX, AccelTCG, false},
		{"forced kvm", "kvm", missing, without, AccelKVM, false},
		{"forced tcg", "tcg", kvm, withVMX, AccelTCG, false},
		{"unknown", "hvf", kvm, withVMX, "", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := chooseAccel(tt.mode, tt.dev, tt.cpuinfo)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, wantErr %v", err, tt.wantErr)
			}
			if got != tt.want {
				t.Fatalf("got %q, want %q", got, tt.want)
			}
		})
	}
}
