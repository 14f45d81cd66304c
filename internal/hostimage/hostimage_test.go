package hostimage

import (
	"bytes"
	"encoding/binary"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/pierrec/lz4/v4"
	"github.com/vigil-project/vigil/internal/cpio"
)

func TestParseLdd(t *testing.T) {
	out := `	linux-vdso.so.1 (0x00007ffd)
	libpixman-1.so.0 => /lib/x86_64-linux-gnu/libpixman-1.so.0 (0x00007f)
	libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)
	/lib64/ld-linux-x86-64.so.2 (0x00007f)
`
	got, err := parseLdd([]byte(out))
	want := []string{"/lib/x86_64-linux-gnu/libpixman-1.so.0", "/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"}
	if err != nil || !reflect.DeepEqual(got, want) {
		t.Fatalf("got %v %v", got, err)
	}
	if _, err := parseLdd([]byte("\tlibfoo.so.1 => not found\n")); err == nil || !strings.Contains(err.Error(), "libfoo") {
		t.Fatalf("missing library: %v", err)
	}
}

func TestTreeOrdersDirectoriesFirst(t *testing.T) {
	tr := newTree()
	tr.add("etc/vigil/ca.pem", 0o644, []byte("x"))
	tr.symlinks["bin/sh"] = "busybox"
	tr.add("bin/busybox", 0o755, []byte("x"))
	dirs, entries := tr.paths()
	if !reflect.DeepEqual(dirs, []string{"bin", "etc", "etc/vigil"}) {
		t.Fatalf("dirs %v", dirs)
	}
	if !reflect.DeepEqual(entries, []string{"bin/busybox", "bin/sh", "etc/vigil/ca.pem"}) {
		t.Fatalf("entries %v", entries)
	}
}

func TestInitScripts(t *testing.T) {
	s := rcS("6.1.0-1-cloud-amd64", []string{"kernel/drivers/virtio/virtio_ring.ko", "kernel/net/bridge/bridge.ko", "kernel/net/core/failover.ko", "kernel/drivers/net/virtio_net.ko"})
	nic, bridge, ready, dhcp := strings.Index(s, "virtio_net.ko"), strings.Index(s, "bridge.ko"), strings.Index(s, "touch "+ModulesReady), strings.Index(s, "udhcpc -i")
	if strings.Index(s, "virtio_ring.ko") > nic || strings.Index(s, "failover.ko") > nic || nic > bridge || bridge > ready || ready > dhcp {
		t.Errorf("module order: the NIC's (with its dependencies in order) first, the rest in the background before the network: %s", s)
	}
	if strings.Count(s, ") &\n") != 2 {
		t.Error("the other modules and the network do not come up in the background")
	}
	if !strings.Contains(udhcpcScript, "mv /run/boot-address.new "+BootAddress) {
		t.Error("the boot address is not written whole")
	}
	for _, want := range []string{"mount -t tmpfs -o mode=0755 tmpfs /run", "insmod /lib/modules/6.1.0-1-cloud-amd64/kernel/net/bridge/bridge.ko", "vigil.bootmac=", "udhcpc -i", "-V vigil-host"} {
		if !strings.Contains(s, want) {
			t.Errorf("rcS lacks %q", want)
		}
	}
	if !strings.Contains(inittab, "::respawn:/bin/vigil boot host") {
		t.Error("inittab does not run the host program")
	}
}

// The kernel reads LZ4 initramfs only in legacy frames: check the magic,
// and that the archive reads back whole across several 8 MiB blocks.
func TestInitramfsIsLegacyLZ4(t *testing.T) {
	tr := newTree()
	big := make([]byte, 20<<20)
	for i := range big {
		big[i] = byte(i * 7 / 1024)
	}
	tr.add("bin/big", 0o755, big)
	tr.add("etc/vigil/ca.pem", 0o644, []byte("ca"))
	dst := filepath.Join(t.TempDir(), "initrd.img")
	if err := writeInitramfs(dst, tr); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	if len(b) < 4 || binary.LittleEndian.Uint32(b) != 0x184C2102 {
		t.Fatalf("not an LZ4 legacy frame: starts % x", b[:min(len(b), 8)])
	}
	raw, err := io.ReadAll(lz4.NewReader(bytes.NewReader(b)))
	if err != nil {
		t.Fatal(err)
	}
	entries, err := cpio.Read(raw)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string][]byte{}
	for _, e := range entries {
		got[e.Name] = e.Data
	}
	if !bytes.Equal(got["bin/big"], big) || string(got["etc/vigil/ca.pem"]) != "ca" {
		t.Fatalf("archive did not read back: %d entries", len(entries))
	}
	if _, ok := got["dev/console"]; !ok {
		t.Fatal("no dev/console")
	}
}

func TestSameFile(t *testing.T) {
	dir := t.TempDir()
	a, b, c := filepath.Join(dir, "a"), filepath.Join(dir, "b"), filepath.Join(dir, "c")
	os.WriteFile(a, []byte("kernel"), 0o644)
	os.WriteFile(b, []byte("kernel"), 0o644)
	os.WriteFile(c, []byte("other"), 0o644)
	same, sum, err := sameFile(a, b)
	if err != nil || !same || len(sum) != 64 {
		t.Fatalf("same files: %v %q %v", same, sum, err)
	}
	if same, _, _ := sameFile(a, c); same {
		t.Fatal("different files are the same")
	}
	if _, _, err := sameFile(a, filepath.Join(dir, "none")); err == nil {
		t.Fatal("a missing file")
	}
}
