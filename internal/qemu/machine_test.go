package qemu

import (
	"os"
	"strings"
	"testing"
)

func validMachine() Machine {
	return Machine{Name: "web1", UUID: "u", MemoryBytes: 128 << 20, CPUs: 2, Accel: AccelTCG,
		Kernel: "/k", Initrd: "/i", Cmdline: "console=ttyS0", Disk: "/d/disk.qcow2", HostPort: 8080, Dir: "/d"}
}

func TestMachineValidate(t *testing.T) {
	tests := []struct {
		name   string
		mutate func(*Machine)
		want   string
	}{
		{"valid", func(*Machine) {}, ""},
		{"no name", func(m *Machine) { m.Name = "" }, "no name"},
		{"tiny memory", func(m *Machine) { m.MemoryBytes = 1 << 20 }, "too small"},
		{"no cpus", func(m *Machine) { m.CPUs = 0 }, "at least 1"},
		{"unresolved accel", func(m *Machine) { m.Accel = "auto" }, "not resolved"},
		{"no image", func(m *Machine) { m.Kernel = "" }, "vigil image build"},
		{"no disk", func(m *Machine) { m.Disk = "" }, "no disk"},
		{"bad port", func(m *Machine) { m.HostPort = 70000 }, "out of range"},
		{"long dir", func(m *Machine) { m.Dir = "/" + strings.Repeat("x", 120) }, "too long for unix sockets"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := validMachine()
			tt.mutate(&m)
			err := m.Validate()
			if tt.want == "" {
				if err != nil {
					t.Fatalf("unexpected error: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want one containing %q", err, tt.want)
			}
		})
	}
}

func TestMachineArgs(t *testing.T) {
	args := strings.Join(validMachine().Args(), " ")
	for _, want := range []string{
		"-machine q35,accel=tcg",
		"-cpu max",
		"-m 128M",
		"-smp 2",
		"-blockdev driver=qcow2,file=disk0-file,node-name=disk0",
		"-device virtio-blk-pci,drive=disk0",
		"hostfwd=tcp:127.0.0.1:8080-:80",
		"-chardev socket,id=agent0,path=/d/agent.sock,server=on,wait=off",
		"-device virtserialport,chardev=agent0,name=org.vigil.agent.0",
		"-device pvpanic-pci",
		"-qmp unix:/d/qmp.sock,server=on,wait=off",
		"-pidfile /d/qemu.pid",
		"-daemonize",
	} {
		if !strings.Contains(args, want) {
			t.Fatalf("args lack %q:\n%s", want, args)
		}
	}
	kvm := validMachine()
	kvm.Accel = AccelKVM
	if a := strings.Join(kvm.Args(), " "); !strings.Contains(a, "-cpu host") {
		t.Fatalf("kvm machine should use -cpu host: %s", a)
	}
}

// TestRAMPad: a machine with RAMPad has RAM that is not a multiple of
// 256 KiB (see LivePrecopySafe); it is part of the hardware a saved state
// must be restored on, and decides whether the memory is copied live.
func TestRAMPad(t *testing.T) {
	tests := []struct {
		name     string
		pad      bool
		accel    string
		wantMem  string
		wantLive bool
	}{
		{"tcg, padded", true, AccelTCG, "-m 131080K", true},
		{"tcg, made before the pad", false, AccelTCG, "-m 128M", false},
		{"kvm, padded", true, AccelKVM, "-m 131080K", true},
		{"kvm", false, AccelKVM, "-m 128M", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := validMachine()
			m.RAMPad, m.Accel = tt.pad, tt.accel
			if a := strings.Join(m.Args(), " "); !strings.Contains(a, tt.wantMem+" ") {
				t.Errorf("args lack %q: %s", tt.wantMem, a)
			}
			if got := LivePrecopySafe(m); got != tt.wantLive {
				t.Errorf("LivePrecopySafe = %v, want %v", got, tt.wantLive)
			}
			if kib := (m.MemoryBytes>>10 + m.Hardware().RAMPadKiB); m.RAMPad && (kib%256 == 0 || kib%8 != 0) {
				t.Errorf("padded RAM of %d KiB: want a multiple of 8 KiB and not of 256 KiB", kib)
			}
		})
	}
	padded, old := validMachine(), validMachine()
	padded.RAMPad = true
	if d := padded.Hardware().Diff(old.Hardware()); len(d) != 1 || !strings.Contains(d[0], "KiB of RAM") {
		t.Fatalf("a state saved with padded RAM must not load into a machine without: diff %q", d)
	}
}

func TestMachineArgsNetdev(t *testing.T) {
	tests := []struct {
		name   string
		mutate func(*Machine)
		want   string
	}{
		{"host forward", func(*Machine) {}, "user,id=net0,hostfwd=tcp:127.0.0.1:8080-:80"},
		{"no host forward", func(m *Machine) { m.NoHostFwd = true }, "user,id=net0"},
		{"incoming without forward", func(m *Machine) { m.Incoming, m.NoHostFwd = true, true }, "user,id=net0"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := validMachine()
			tt.mutate(&m)
			args := m.Args()
			var netdev string
			for i, a := range args {
				if a == "-netdev" && i+1 < len(args) {
					netdev = args[i+1]
				}
			}
			if netdev != tt.want {
				t.Fatalf("-netdev %q, want %q", netdev, tt.want)
			}
			if args[len(args)-1] != "-daemonize" {
				t.Fatalf("args do not end with -daemonize: %v", args)
			}
		})
	}
}

func TestAliveAndReadPID(t *testing.T) {
	if Alive(0x7ffffff0) {
		t.Fatal("a pid that cannot exist is alive")
	}
	dir := t.TempDir()
	for _, tt := range []struct {
		content string
		ok      bool
	}{{"123\n", true}, {"", false}, {"abc", false}, {"-5", false}} {
		p := dir + "/pid"
		if err := writeFile(p, tt.content); err != nil {
			t.Fatal(err)
		}
		_, err := readPID(p)
		if (err == nil) != tt.ok {
			t.Fatalf("readPID(%q) err = %v, want ok=%v", tt.content, err, tt.ok)
		}
	}
}

func writeFile(p, s string) error { return os.WriteFile(p, []byte(s), 0o600) }
