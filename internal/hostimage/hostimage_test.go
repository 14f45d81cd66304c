package hostimage

import (
	"reflect"
	"strings"
	"testing"
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
	s := rcS("6.1.0-1-cloud-amd64", []string{"kernel/net/bridge/bridge.ko"})
	for _, want := range []string{"mount -t tmpfs -o mode=0755 tmpfs /run", "insmod /lib/modules/6.1.0-1-cloud-amd64/kernel/net/bridge/bridge.ko", "vigil.bootmac=", "udhcpc -i", "-V vigil-host"} {
		if !strings.Contains(s, want) {
			t.Errorf("rcS lacks %q", want)
		}
	}
	if !strings.Contains(inittab, "::respawn:/bin/vigil boot host") {
		t.Error("inittab does not run the host program")
	}
}
