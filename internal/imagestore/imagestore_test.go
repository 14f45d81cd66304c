package imagestore

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vigil-project/vigil/internal/testenv"
)

func needQemuImg(t *testing.T) {
	t.Helper()
	testenv.NeedProgram(t, "qemu-img", "qemu-utils")
}

func run(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		t.Fatalf("%v: %v\n%s", args, err, out)
	}
}

// TestImport: what Vigil can run goes in, with its format and sizes; what
// it cannot is refused with the reason, and leaves nothing behind.
func TestImport(t *testing.T) {
	needQemuImg(t)
	dir := t.TempDir()
	mk := func(name string, f func(p string)) string {
		p := filepath.Join(dir, name)
		f(p)
		return p
	}
	qcow := mk("ok.qcow2", func(p string) { run(t, "qemu-img", "create", "-q", "-f", "qcow2", p, "64M") })
	raw := mk("ok.raw", func(p string) {
		b := make([]byte, 1<<20)
		b[510], b[511] = 0x55, 0xaa
		os.WriteFile(p, b, 0o644)
	})
	gpt := mk("gpt.raw", func(p string) {
		b := make([]byte, 1<<20)
		copy(b[512:], "EFI PART")
		os.WriteFile(p, b, 0o644)
	})
	iso := mk("ok.iso", func(p string) {
		b := make([]byte, 20*2048)
		copy(b[16*2048+1:], "CD001")
		os.WriteFile(p, b, 0o644)
	})
	text := mk("notes.txt", func(p string) { os.WriteFile(p, []byte(strings.Repeat("hello\n", 200)), 0o644) })
	backing := mk("backed.qcow2", func(p string) { run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", qcow, "-F", "qcow2", p) })
	datafile := mk("datafile.qcow2", func(p string) {
		run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file="+filepath.Join(dir, "data.raw"), p, "16M")
	})
	truncated := mk("truncated.qcow2", func(p string) {
		run(t, "qemu-img", "create", "-q", "-f", "qcow2", p, "64M")
		run(t, "qemu-io", "-c", "write -P 0xab 0 8M", p)
		run(t, "truncate", "-s", "2M", p)
	})
	vmdk := mk("disk.vmdk", func(p string) { run(t, "qemu-img", "create", "-q", "-f", "vmdk", p, "16M") })

	tests := []struct {
		file       string
		max        int64
		wantErr    error
		wantFormat string
		wantVSize  int64
	}{
		{qcow, 1 << 30, nil, FormatQcow2, 64 << 20},
		{raw, 1 << 30, nil, FormatRaw, 1 << 20},
		{gpt, 1 << 30, nil, FormatRaw, 1 << 20},
		{iso, 1 << 30, nil, FormatISO, 20 * 2048},
		{text, 1 << 30, ErrNotImage, "", 0},
		{backing, 1 << 30, ErrBacking, "", 0},
		{datafile, 1 << 30, ErrBacking, "", 0},
		{truncated, 1 << 30, ErrCorrupt, "", 0},
		{vmdk, 1 << 30, ErrNotImage, "", 0},
		{qcow, 1000, ErrTooLarge, "", 0},
	}
	for _, tt := range tests {
		t.Run(filepath.Base(tt.file), func(t *testing.T) {
			s, err := Open(t.TempDir())
			if err != nil {
				t.Fatal(err)
			}
			f, _ := os.Open(tt.file)
			defer f.Close()
			info, err := s.Import(context.Background(), f, tt.max)
			left, _ := os.ReadDir(s.Dir())
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("import: %v, want %v", err, tt.wantErr)
				}
				if len(left) != 0 {
					t.Fatalf("a refused import left %d files", len(left))
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			b, _ := os.ReadFile(tt.file)
			sum := sha256.Sum256(b)
			if info.Digest != "sha256:"+hex.EncodeToString(sum[:]) || info.Format != tt.wantFormat || info.VirtualSize != tt.wantVSize || info.FileSize != int64(len(b)) {
				t.Fatalf("info %+v", info)
			}
			if got, err := os.ReadFile(s.Path(info.Digest)); err != nil || !bytes.Equal(got, b) || !s.Has(info.Digest) {
				t.Fatalf("stored blob: %v", err)
			}
			if list, _ := s.List(); len(list) != 1 || list[0] != info.Digest {
				t.Fatalf("list %v", list)
			}
		})
	}
}

func TestAddChecksTheDigest(t *testing.T) {
	s, _ := Open(t.TempDir())
	data := []byte("blob")
	sum := sha256.Sum256(data)
	good := "sha256:" + hex.EncodeToString(sum[:])
	if err := s.Add(bytes.NewReader([]byte("other")), good, 100); !errors.Is(err, ErrDigest) {
		t.Fatalf("wrong content: %v", err)
	}
	if err := s.Add(bytes.NewReader(data), "sha256:../../etc/passwd", 100); !errors.Is(err, ErrDigest) {
		t.Fatalf("a path as digest: %v", err)
	}
	if err := s.Add(bytes.NewReader(data), good, 100); err != nil || !s.Has(good) {
		t.Fatalf("add: %v", err)
	}
	if left, _ := os.ReadDir(s.Dir()); len(left) != 1 {
		t.Fatalf("%d files, want the blob only", len(left))
	}
}

// TestLinkFrom: a blob goes to a second store as a hard link, once.
func TestLinkFrom(t *testing.T) {
	a, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	b, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	data := []byte("blob")
	sum := sha256.Sum256(data)
	d := "sha256:" + hex.EncodeToString(sum[:])
	if err := a.Add(bytes.NewReader(data), d, 100); err != nil {
		t.Fatal(err)
	}
	if err := b.LinkFrom(a, "sha256:nope"); err == nil {
		t.Fatal("linked a bad digest")
	}
	for range 2 {
		if err := b.LinkFrom(a, d); err != nil {
			t.Fatal(err)
		}
	}
	sa, _ := os.Stat(a.Path(d))
	sb, _ := os.Stat(b.Path(d))
	if !os.SameFile(sa, sb) {
		t.Fatal("the blob was not linked")
	}
	missing := "sha256:" + strings.Repeat("0", 64)
	if err := b.LinkFrom(a, missing); err == nil || b.Has(missing) {
		t.Fatalf("linked a blob the other store lacks: %v", err)
	}
}
