package cpio

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func mustRead(t *testing.T, b []byte) []Entry {
	t.Helper()
	es, err := Read(b)
	if err != nil {
		t.Fatal(err)
	}
	return es
}

func TestCPIORoundTrip(t *testing.T) {
	var buf bytes.Buffer
	c := NewWriter(&buf)
	c.Dir("bin", 0o755)
	c.File("bin/hello", 0o755, []byte("hello world")) // 11 bytes: exercises padding
	c.File("empty", 0o644, nil)
	c.Symlink("init", "bin/hello")
	c.CharDev("console", 0o600, 5, 1)
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	got := mustRead(t, buf.Bytes())
	want := []struct {
		name string
		mode uint32
		data string
	}{
		{"bin", ModeDir | 0o755, ""},
		{"bin/hello", ModeFile | 0o755, "hello world"},
		{"empty", ModeFile | 0o644, ""},
		{"init", ModeSymlink | 0o777, "bin/hello"},
		{"console", ModeCharDev | 0o600, ""},
	}
	if len(got) != len(want) {
		t.Fatalf("got %d entries, want %d", len(got), len(want))
	}
	seen := map[uint32]bool{}
	for i, w := range want {
		g := got[i]
		if g.Name != w.name || g.Mode != w.mode || string(g.Data) != w.data {
			t.Errorf("entry %d: got %q mode %o data %q, want %q mode %o data %q", i, g.Name, g.Mode, string(g.Data), w.name, w.mode, w.data)
		}
		if seen[g.Ino] {
			t.Errorf("duplicate inode %d", g.Ino)
		}
		seen[g.Ino] = true
	}
	if got[4].RMaj != 5 || got[4].RMin != 1 {
		t.Errorf("console rdev %d:%d", got[4].RMaj, got[4].RMin)
	}

	// Cross-check with GNU cpio when it is installed.
	if _, err := exec.LookPath("cpio"); err != nil {
		t.Skip("cpio not installed")
	}
	cmd := exec.Command("cpio", "-t", "--quiet")
	cmd.Stdin = bytes.NewReader(buf.Bytes())
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("cpio -t: %v", err)
	}
	if names := strings.Fields(string(out)); !slices.Equal(names, []string{"bin", "bin/hello", "empty", "init", "console"}) {
		t.Fatalf("cpio -t listed %q", names)
	}
	dir := t.TempDir()
	cmd = exec.Command("cpio", "-i", "--quiet", "--no-absolute-filenames", "bin", "bin/hello", "init")
	cmd.Dir = dir
	cmd.Stdin = bytes.NewReader(buf.Bytes())
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("cpio -i: %v: %s", err, out)
	}
	if b, err := os.ReadFile(filepath.Join(dir, "init")); err != nil || string(b) != "hello world" {
		t.Fatalf("extracted symlink target content %q, %v", b, err)
	}
}

func TestReadRefusesBadArchives(t *testing.T) {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	w.File("a", 0o644, []byte("data"))
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	good := buf.Bytes()
	for name, b := range map[string][]byte{
		"empty":     nil,
		"truncated": good[:len(good)-20],
		"bad magic": append([]byte("070702"), good[6:]...),
		"trailing":  append(append([]byte(nil), good...), 0, 0, 0, 0),
	} {
		if _, err := Read(b); err == nil {
			t.Errorf("%s: read without error", name)
		}
	}
}

func FuzzRead(f *testing.F) {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	w.Dir("d", 0o755)
	w.File("d/f", 0o644, []byte("hello"))
	w.Symlink("l", "d/f")
	w.Close()
	f.Add(buf.Bytes())
	f.Fuzz(func(t *testing.T, b []byte) {
		Read(b) // must not panic
	})
}
