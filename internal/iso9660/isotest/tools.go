package isotest

import (
	"bufio"
	"bytes"
	"io/fs"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/vigil-project/vigil/internal/testenv"
)

// CheckWithTools writes img to a file and has each installed external tool
// confirm what Linux userspace will see: blkid must find TYPE=iso9660 with
// the label, and isoinfo and xorriso must list exactly the files, under
// their Rock Ridge names, with the given contents. Each tool is a subtest,
// skipped when the program is not installed. Names must be plain enough to
// pass through the tools' listings unquoted (no quotes, backslashes or
// leading/trailing spaces).
func CheckWithTools(t *testing.T, img []byte, label string, files map[string][]byte) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "image.iso")
	if err := os.WriteFile(path, img, 0o644); err != nil {
		t.Fatal(err)
	}
	want := slices.Sorted(maps.Keys(files))
	t.Run("blkid", func(t *testing.T) {
		need(t, "blkid", "util-linux")
		// -p probes the file itself and bypasses blkid's cache.
		out := run(t, "blkid", "-p", "-o", "export", path)
		got := map[string]string{}
		for line := range strings.Lines(string(out)) {
			k, v, _ := strings.Cut(strings.TrimSpace(line), "=")
			got[k] = v
		}
		if got["TYPE"] != "iso9660" || got["LABEL"] != label {
			t.Fatalf("blkid found TYPE=%q LABEL=%q, want iso9660 and %q:\n%s", got["TYPE"], got["LABEL"], label, out)
		}
	})
	t.Run("isoinfo", func(t *testing.T) {
		need(t, "isoinfo", "genisoimage")
		out := string(run(t, "isoinfo", "-d", "-i", path))
		if !strings.Contains(out, "Volume id: "+label+"\n") {
			t.Fatalf("isoinfo -d does not show volume id %q:\n%s", label, out)
		}
		if !strings.Contains(out, "Rock Ridge signatures version 1 found") {
			t.Fatalf("isoinfo -d finds no Rock Ridge:\n%s", out)
		}
		listing := run(t, "isoinfo", "-R", "-l", "-i", path)
		var got []string
		sc := bufio.NewScanner(bytes.NewReader(listing))
		for sc.Scan() {
			// Lines end in "[ extent flags]  name ".
			_, name, ok := strings.Cut(sc.Text(), "]  ")
			name = strings.TrimSuffix(name, " ")
			if ok && name != "." && name != ".." {
				got = append(got, name)
			}
		}
		slices.Sort(got)
		if !slices.Equal(got, want) {
			t.Fatalf("isoinfo -R -l lists %q, want %q:\n%s", got, want, listing)
		}
		for _, name := range want {
			if data := run(t, "isoinfo", "-R", "-i", path, "-x", "/"+name); !bytes.Equal(data, files[name]) {
				t.Fatalf("isoinfo -x /%s gives %q, want %q", name, data, files[name])
			}
		}
	})
	t.Run("xorriso", func(t *testing.T) {
		need(t, "xorriso", "xorriso")
		dir := filepath.Join(t.TempDir(), "out")
		// Extracted files and directories keep the image's read-only
		// modes; make them writable again so TempDir can remove them.
		t.Cleanup(func() {
			_ = filepath.WalkDir(dir, func(p string, _ fs.DirEntry, _ error) error {
				_ = os.Chmod(p, 0o755)
				return nil
			})
		})
		// -toc reports which extensions xorriso loaded the tree with.
		cmd := exec.Command("xorriso", "-osirrox", "on", "-indev", path, "-toc", "-extract", "/", dir)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		stdout, err := cmd.Output()
		if err != nil {
			t.Fatalf("xorriso extract: %v\n%s", err, stderr.Bytes())
		}
		// xorriso reports problems it works around (bad Rock Ridge,
		// odd directory records) as messages, not as an exit status.
		for _, severity := range []string{"WARNING", "SORRY", "FAILURE", "FATAL"} {
			if strings.Contains(stderr.String(), ": "+severity+" :") {
				t.Fatalf("xorriso complains:\n%s", stderr.Bytes())
			}
		}
		if !regexp.MustCompile(`(?m)^ISO loaded\s*:.*Rock_Ridge`).Match(stdout) {
			t.Fatalf("xorriso did not load Rock Ridge:\n%s", stdout)
		}
		entries, err := os.ReadDir(dir)
		if err != nil && !(len(want) == 0 && os.IsNotExist(err)) {
			t.Fatal(err)
		}
		var got []string
		for _, e := range entries {
			got = append(got, e.Name())
		}
		if !slices.Equal(got, want) {
			t.Fatalf("xorriso extracted %q, want %q", got, want)
		}
		for _, name := range want {
			data, err := os.ReadFile(filepath.Join(dir, name))
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(data, files[name]) {
				t.Fatalf("xorriso extracted %s as %q, want %q", name, data, files[name])
			}
		}
	})
}

func need(t *testing.T, program, pkg string) { t.Helper(); testenv.NeedProgram(t, program, pkg) }

func run(t *testing.T, name string, args ...string) []byte {
	t.Helper()
	cmd := exec.Command(name, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, stderr.Bytes())
	}
	return out
}
