package guestimage

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vigil-project/vigil/internal/cpio"
)

// readCPIO parses an archive the writer made.
func readCPIO(t *testing.T, b []byte) []cpio.Entry {
	t.Helper()
	es, err := cpio.Read(b)
	if err != nil {
		t.Fatal(err)
	}
	return es
}

// fakeInputs creates small stand-ins for busybox, the agent and modules.
func fakeInputs(t *testing.T) initramfsSpec {
	t.Helper()
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o755); err != nil {
			t.Fatal(err)
		}
		return p
	}
	spec := initramfsSpec{
		KernelVersion: "6.1.0-99-cloud-amd64",
		Busybox:       write("busybox", "BUSYBOX"),
		Agent:         write("vigil-guest", "AGENT"),
		Modules:       map[string]string{},
	}
	for _, m := range guestModules() {
		spec.Modules[m] = write("mods/"+m+".ko", "KO:"+m)
	}
	return spec
}

func TestWriteInitramfs(t *testing.T) {
	spec := fakeInputs(t)
	var buf bytes.Buffer
	if err := writeInitramfs(&buf, spec); err != nil {
		t.Fatal(err)
	}
	zr, err := gzip.NewReader(&buf)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	entries := readCPIO(t, raw)
	byName := map[string]cpio.Entry{}
	for _, e := range entries {
		if _, dup := byName[e.Name]; dup {
			t.Errorf("duplicate entry %q", e.Name)
		}
		// The kernel creates files in archive order: parents first.
		if d := filepath.Dir(e.Name); d != "." {
			if p, ok := byName[d]; !ok || p.Mode&0o170000 != cpio.ModeDir {
				t.Errorf("%q appears before its directory %q", e.Name, d)
			}
		}
		byName[e.Name] = e
	}
	checks := []struct {
		name string
		mode uint32
		data string
	}{
		{"init", cpio.ModeSymlink | 0o777, "bin/busybox"},
		{"bin/busybox", cpio.ModeFile | 0o755, "BUSYBOX"},
		{"bin/sh", cpio.ModeSymlink | 0o777, "busybox"},
		{"bin/poweroff", cpio.ModeSymlink | 0o777, "busybox"},
		{"bin/vigil-guest", cpio.ModeFile | 0o755, "AGENT"},
		{"etc/inittab", cpio.ModeFile | 0o644, inittab()},
		{"etc/init.d/rcS", cpio.ModeFile | 0o755, rcS(spec.KernelVersion, guestModules())},
		{"etc/init.d/rcK", cpio.ModeFile | 0o755, rcK()},
		{"etc/acpi/PWRF/00000080", cpio.ModeFile | 0o755, acpiPowerScript()},
		{"dev/console", cpio.ModeCharDev | 0o600, ""},
		{"lib/modules/6.1.0-99-cloud-amd64/kernel/drivers/virtio/virtio_ring.ko", cpio.ModeFile | 0o644, "KO:drivers/virtio/virtio_ring"},
		{"lib/modules/6.1.0-99-cloud-amd64/kernel/drivers/misc/pvpanic/pvpanic-pci.ko", cpio.ModeFile | 0o644, "KO:drivers/misc/pvpanic/pvpanic-pci"},
	}
	for _, c := range checks {
		e, ok := byName[c.name]
		if !ok {
			t.Errorf("missing %s", c.name)
			continue
		}
		if e.Mode != c.mode || string(e.Data) != c.data {
			t.Errorf("%s: mode %o data %q, want mode %o data %q", c.name, e.Mode, string(e.Data), c.mode, c.data)
		}
	}
	// Every applet the scripts call must be linked.
	for _, a := range busyboxApplets() {
		if _, ok := byName["bin/"+a]; !ok {
			t.Errorf("applet %s not linked", a)
		}
	}

	// Missing inputs are reported, not silently skipped.
	delete(spec.Modules, "drivers/input/evdev")
	if err := writeInitramfs(io.Discard, spec); err == nil || !strings.Contains(err.Error(), "drivers/input/evdev") {
		t.Fatalf("want error naming the missing module, got %v", err)
	}
}

func TestScripts(t *testing.T) {
	mods := guestModules()
	script := rcS("6.1.0-1-cloud-amd64", mods)

	// Modules are insmod'ed exactly in the given order.
	last := -1
	for _, m := range mods {
		line := "insmod /lib/modules/6.1.0-1-cloud-amd64/kernel/" + m + ".ko"
		i := strings.Index(script, line)
		if i < 0 {
			t.Fatalf("rcS lacks %q", line)
		}
		if i < last {
			t.Errorf("%s loaded out of order", m)
		}
		last = i
	}
	order := []string{
		"mount -t proc", "mount -t devtmpfs", "vigil.name=*", "insmod ",
		"ip addr add 10.0.2.15/24 dev eth0", "ip route add default via 10.0.2.2",
		"mount -t ext2 /dev/vda /data", "mke2fs -q /dev/vda", "/www/index.html",
		"httpd -p 80 -h /www", "acpid",
	}
	pos := -1
	for _, s := range order {
		i := strings.Index(script, s)
		if i < 0 {
			t.Fatalf("rcS lacks %q", s)
		}
		if i < pos {
			t.Errorf("%q out of order in rcS", s)
		}
		pos = i
	}
	tab := inittab()
	for _, s := range []string{"::sysinit:/etc/init.d/rcS\n", "::respawn:/bin/vigil-guest\n", "::shutdown:/etc/init.d/rcK\n"} {
		if !strings.Contains(tab, s) {
			t.Errorf("inittab lacks %q", s)
		}
	}
	if !strings.Contains(rcK(), "umount /data") || !strings.Contains(acpiPowerScript(), "poweroff") {
		t.Error("shutdown scripts incomplete")
	}

	// Syntax-check the scripts with the shell that will run them.
	sh, err := exec.LookPath("busybox")
	if err != nil {
		t.Skip("busybox not installed; skipping shell syntax check")
	}
	for name, s := range map[string]string{"rcS": script, "rcK": rcK(), "acpi": acpiPowerScript()} {
		cmd := exec.Command(sh, "sh", "-n")
		cmd.Stdin = strings.NewReader(s)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("%s: sh -n: %v: %s", name, err, out)
		}
	}
}

// TestBlankDiskCheck runs the rcS blank-disk test against real files, since
// getting it wrong either never formats or formats user data.
func TestBlankDiskCheck(t *testing.T) {
	bb, err := exec.LookPath("busybox")
	if err != nil {
		t.Skip("busybox not installed")
	}
	dir := t.TempDir()
	blank := filepath.Join(dir, "blank")
	used := filepath.Join(dir, "used")
	if err := os.WriteFile(blank, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	data := make([]byte, 1<<20)
	data[40000] = '\n' // a lone newline must not look blank
	if err := os.WriteFile(used, data, 0o644); err != nil {
		t.Fatal(err)
	}
	check := `[ "$(busybox head -c 65536 "$1" | busybox tr -d '\000' | busybox wc -c)" -eq 0 ]`
	if !strings.Contains(rcS("v", nil), `[ "$(head -c 65536 /dev/vda | tr -d '\000' | wc -c)" -eq 0 ]`) {
		t.Fatal("rcS blank check changed; update this test")
	}
	for path, wantBlank := range map[string]bool{blank: true, used: false} {
		err := exec.Command(bb, "sh", "-c", check, "sh", path).Run()
		if (err == nil) != wantBlank {
			t.Errorf("%s: blank=%v, want %v", filepath.Base(path), err == nil, wantBlank)
		}
	}
}

func writeImageDir(t *testing.T, dir string, img *Image) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{kernelName, initrdName} {
		if err := os.WriteFile(filepath.Join(dir, f), []byte(f), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := saveManifest(dir, img); err != nil {
		t.Fatal(err)
	}
}

func TestManifestLoadSave(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "default")
	want := &Image{Kernel: kernelName, Initrd: initrdName, Cmdline: DefaultCmdline,
		KernelVersion: "6.1.0-56-cloud-amd64", AgentSHA256: "abc", BuiltAt: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	if _, err := Load(dir); !errors.Is(err, ErrNotBuilt) {
		t.Fatalf("missing dir: got %v, want ErrNotBuilt", err)
	}
	writeImageDir(t, dir, want)
	got, err := Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got.Kernel != filepath.Join(dir, kernelName) || got.Initrd != filepath.Join(dir, initrdName) {
		t.Errorf("paths not resolved against dir: %+v", got)
	}
	if got.Cmdline != want.Cmdline || got.KernelVersion != want.KernelVersion || got.AgentSHA256 != want.AgentSHA256 || !got.BuiltAt.Equal(want.BuiltAt) {
		t.Errorf("got %+v, want %+v", got, want)
	}
	// The manifest stores relative names so the directory can move.
	var raw map[string]any
	b, _ := os.ReadFile(filepath.Join(dir, manifestName))
	if err := json.Unmarshal(b, &raw); err != nil || raw["kernel"] != kernelName {
		t.Errorf("manifest not relative: %s", b)
	}
	if leftovers, _ := filepath.Glob(filepath.Join(dir, ".*")); len(leftovers) != 0 {
		t.Errorf("temp files left behind: %v", leftovers)
	}

	if err := os.Remove(filepath.Join(dir, initrdName)); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(dir); !errors.Is(err, ErrNotBuilt) {
		t.Fatalf("missing initrd: got %v, want ErrNotBuilt", err)
	}
	if err := os.WriteFile(filepath.Join(dir, manifestName), []byte("{not json"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(dir); err == nil || errors.Is(err, ErrNotBuilt) {
		t.Fatalf("corrupt manifest: got %v, want a parse error", err)
	}
}

func TestNeedsRebuild(t *testing.T) {
	img := &Image{AgentSHA256: "aaa", Format: Format}
	tests := []struct {
		name    string
		img     *Image
		loadErr error
		sum     string
		want    bool
	}{
		{"not built", nil, fmt.Errorf("x: %w", ErrNotBuilt), "aaa", true},
		{"corrupt", nil, errors.New("parse manifest"), "aaa", true},
		{"agent changed", img, nil, "bbb", true},
		{"old format", &Image{AgentSHA256: "aaa", Format: Format - 1}, nil, "aaa", true},
		{"up to date", img, nil, "aaa", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, why := needsRebuild(tc.img, tc.loadErr, tc.sum)
			if got != tc.want || (got && why == "") {
				t.Fatalf("got (%v, %q), want %v", got, why, tc.want)
			}
		})
	}
}

func TestEnsureUsesExistingImage(t *testing.T) {
	root := t.TempDir()
	agent := filepath.Join(root, "vigil-guest")
	if err := os.WriteFile(agent, []byte("agent v1"), 0o755); err != nil {
		t.Fatal(err)
	}
	sum, err := fileSHA256(agent)
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(root, "default")
	writeImageDir(t, dir, &Image{Kernel: kernelName, Initrd: initrdName, AgentSHA256: sum, Format: Format})
	// No CacheDir: any attempt to build would fail, so success proves the
	// existing image was reused.
	o := Options{Dir: dir, GuestAgent: agent}
	if _, err := Ensure(t.Context(), o); err != nil {
		t.Fatalf("up-to-date image: %v", err)
	}
	if err := os.WriteFile(agent, []byte("agent v2"), 0o755); err != nil {
		t.Fatal(err)
	}
	var progress bytes.Buffer
	o.Progress = &progress
	if _, err := Ensure(t.Context(), o); err == nil {
		t.Fatal("changed agent: want a rebuild attempt (which fails without CacheDir)")
	}
	if !strings.Contains(progress.String(), "guest agent changed") {
		t.Fatalf("progress %q does not explain the rebuild", progress.String())
	}
}

func TestReplaceDir(t *testing.T) {
	root := t.TempDir()
	dst := filepath.Join(root, "default")
	for i, content := range []string{"first", "second"} {
		stage := filepath.Join(root, fmt.Sprintf(".stage%d", i))
		if err := os.MkdirAll(stage, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(stage, "f"), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := replaceDir(stage, dst); err != nil {
			t.Fatal(err)
		}
		if b, _ := os.ReadFile(filepath.Join(dst, "f")); string(b) != content {
			t.Fatalf("dst holds %q, want %q", b, content)
		}
	}
	entries, _ := os.ReadDir(root)
	if len(entries) != 1 {
		t.Fatalf("leftovers beside the image: %v", entries)
	}
}

func TestLocateKernelNamesMissingModule(t *testing.T) {
	root := t.TempDir()
	ver := "6.1.0-1-cloud-amd64"
	if err := os.MkdirAll(filepath.Join(root, "boot"), 0o755); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(root, "boot", "vmlinuz-"+ver), []byte("k"), 0o644)
	for _, m := range guestModules() {
		if m == "drivers/char/virtio_console" {
			continue
		}
		p := filepath.Join(root, "lib", "modules", ver, "kernel", m+".ko")
		os.MkdirAll(filepath.Dir(p), 0o755)
		os.WriteFile(p, []byte("ko"), 0o644)
	}
	_, err := locateModules(filepath.Join(root, "lib", "modules", ver))
	if err == nil || !strings.Contains(err.Error(), "drivers/char/virtio_console") {
		t.Fatalf("got %v, want error naming virtio_console", err)
	}
}

func TestCheckStatic(t *testing.T) {
	if _, err := os.Stat("/bin/busybox"); err == nil {
		if err := checkBusybox("/bin/busybox"); err != nil {
			t.Logf("host busybox rejected (is busybox-static installed?): %v", err)
		}
	}
	if err := checkBusybox(filepath.Join(t.TempDir(), "busybox")); err == nil || !strings.Contains(err.Error(), "busybox-static") {
		t.Fatalf("missing busybox: got %v", err)
	}
	if _, err := os.Stat("/bin/ls"); err == nil {
		if err := checkStatic("/bin/ls"); err == nil {
			t.Log("/bin/ls is static on this host; dynamic case not exercised")
		} else if !strings.Contains(err.Error(), "dynamically linked") {
			t.Fatalf("dynamic binary: got %v", err)
		}
	}
}
