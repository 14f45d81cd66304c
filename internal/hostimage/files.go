package hostimage

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strings"
)

// tree is what goes into the initramfs: files copied from the build
// machine, files made here and symlinks, by their path in the image
// (relative, no leading slash).
type tree struct {
	files    map[string]string // image path → path on the build machine
	made     map[string][]byte // image path → content
	modes    map[string]os.FileMode
	symlinks map[string]string // image path → target
}

func newTree() *tree {
	return &tree{files: map[string]string{}, made: map[string][]byte{}, modes: map[string]os.FileMode{}, symlinks: map[string]string{}}
}

func imagePath(p string) string { return strings.TrimPrefix(path.Clean(filepath.ToSlash(p)), "/") }

// copyFile adds the build machine's file src at dst, following symlinks.
func (t *tree) copyFile(src, dst string) error {
	st, err := os.Stat(src)
	if err != nil {
		return fmt.Errorf("host image: %w", err)
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("host image: %s is not a regular file", src)
	}
	t.files[imagePath(dst)] = src
	t.modes[imagePath(dst)] = st.Mode().Perm()
	return nil
}

// add puts content made by the builder at dst.
func (t *tree) add(dst string, mode os.FileMode, content []byte) {
	t.made[imagePath(dst)] = content
	t.modes[imagePath(dst)] = mode
}

// copyDir adds every file below the build machine's dir at the same path,
// but those whose names match a skip pattern; symlinks stay symlinks (their
// targets must be in the image too).
func (t *tree) copyDir(dir string, skip []string) error {
	return filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return fmt.Errorf("host image: %w", err)
		}
		for _, pat := range skip {
			if ok, _ := filepath.Match(pat, d.Name()); ok && p != dir {
				if d.IsDir() {
					return filepath.SkipDir
				}
				return nil
			}
		}
		switch {
		case d.Type()&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return fmt.Errorf("host image: %w", err)
			}
			t.symlinks[imagePath(p)] = target
		case d.Type().IsRegular():
			return t.copyFile(p, p)
		}
		return nil
	})
}

// copyProgram adds the build machine's program and the shared libraries it
// loads (as ldd lists them, at the same paths).
func (t *tree) copyProgram(ctx context.Context, prog string) error {
	if err := t.copyFile(prog, prog); err != nil {
		return err
	}
	out, err := exec.CommandContext(ctx, "ldd", prog).CombinedOutput()
	if err != nil {
		if bytes.Contains(out, []byte("not a dynamic executable")) {
			return nil // static
		}
		return fmt.Errorf("host image: ldd %s: %w: %s", prog, err, strings.TrimSpace(string(out)))
	}
	libs, err := parseLdd(out)
	if err != nil {
		return fmt.Errorf("host image: ldd %s: %w", prog, err)
	}
	for _, l := range libs {
		if err := t.copyFile(l, l); err != nil {
			return err
		}
	}
	return nil
}

// parseLdd returns the absolute paths ldd's output names: "libx.so.1 =>
// /lib/.../libx.so.1 (0x...)" and the loader's "/lib64/ld-linux-x86-64.so.2
// (0x...)". A library ldd could not find is an error.
func parseLdd(out []byte) ([]string, error) {
	var libs []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "linux-vdso") {
			continue
		}
		if name, rest, ok := strings.Cut(line, "=>"); ok {
			rest = strings.TrimSpace(rest)
			if strings.HasPrefix(rest, "not found") {
				return nil, fmt.Errorf("library %s not found", strings.TrimSpace(name))
			}
			if p, _, _ := strings.Cut(rest, " "); strings.HasPrefix(p, "/") {
				libs = append(libs, p)
			}
			continue
		}
		if p, _, _ := strings.Cut(line, " "); strings.HasPrefix(p, "/") {
			libs = append(libs, p)
		}
	}
	return libs, nil
}

// paths lists every image path with the directories they need, sorted so
// that a directory comes before what it holds.
func (t *tree) paths() (dirs, entries []string) {
	seen := map[string]bool{}
	var all []string
	for _, m := range []map[string]string{t.files, t.symlinks} {
		for p := range m {
			all = append(all, p)
		}
	}
	for p := range t.made {
		all = append(all, p)
	}
	for _, p := range all {
		for d := path.Dir(p); d != "." && !seen[d]; d = path.Dir(d) {
			seen[d] = true
			dirs = append(dirs, d)
		}
	}
	sort.Strings(dirs) // "a" sorts before "a/b"
	sort.Strings(all)
	return dirs, all
}
