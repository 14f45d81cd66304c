// Package debkernel fetches Debian's cloud kernel package with apt, unpacks
// it, and finds kernel modules with what they depend on, for the initramfs
// images Vigil builds (the guest image and the host image).
package debkernel

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
)

// kernelMetaPackage is the Debian meta-package whose dependency names the
// current cloud kernel. Resolving it at build time picks up kernel security
// updates without code changes.
const kernelMetaPackage = "linux-image-cloud-amd64"

// resolveKernelPackage asks apt which versioned kernel package the
// meta-package currently depends on.
func resolveKernelPackage(ctx context.Context) (string, error) {
	if _, err := exec.LookPath("apt-cache"); err != nil {
		return "", fmt.Errorf("apt-cache not found: install apt (a Debian-based host is needed to fetch the guest kernel): %w", err)
	}
	cmd := exec.CommandContext(ctx, "apt-cache", "depends", kernelMetaPackage)
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("apt-cache depends %s failed (run apt-get update): %w: %s", kernelMetaPackage, err, lastLines(out, 3))
	}
	pkg, ok := parseDepends(out)
	if !ok {
		return "", fmt.Errorf("apt-cache does not know a kernel for %s (run apt-get update)", kernelMetaPackage)
	}
	return pkg, nil
}

// parseDepends extracts the versioned linux-image package from
// `apt-cache depends` output.
func parseDepends(out []byte) (string, bool) {
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		line := strings.TrimLeft(strings.TrimSpace(sc.Text()), "|")
		dep, ok := strings.CutPrefix(line, "Depends:")
		if !ok {
			continue
		}
		dep = strings.TrimSpace(dep)
		// Virtual packages are shown as <name>; they cannot be downloaded.
		if strings.HasPrefix(dep, "linux-image-") && !strings.ContainsAny(dep, "<> ") {
			return dep, true
		}
	}
	return "", false
}

// fetchKernelDeb returns the path of pkg's .deb in cacheDir, downloading it
// with apt-get if it is not cached yet.
func fetchKernelDeb(ctx context.Context, pkg, cacheDir string, progress func(string, ...any)) (string, error) {
	if deb, ok := cachedDeb(cacheDir, pkg); ok {
		progress("using cached kernel package %s", filepath.Base(deb))
		return deb, nil
	}
	if _, err := exec.LookPath("apt-get"); err != nil {
		return "", fmt.Errorf("apt-get not found: install apt: %w", err)
	}
	progress("downloading kernel package %s", pkg)
	// Download into a private directory so an interrupted download never
	// leaves a truncated .deb where cachedDeb would pick it up.
	tmp, err := os.MkdirTemp(cacheDir, ".download-*")
	if err != nil {
		return "", fmt.Errorf("create download dir: %w", err)
	}
	defer os.RemoveAll(tmp)
	// As root, apt warns that _apt cannot access the directory and
	// downloads unsandboxed; that is harmless.
	cmd := exec.CommandContext(ctx, "apt-get", "download", pkg)
	cmd.Dir = tmp
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("apt-get download %s failed (run apt-get update and check network access): %w: %s", pkg, err, lastLines(out, 3))
	}
	debs, _ := filepath.Glob(filepath.Join(tmp, pkg+"_*.deb"))
	if len(debs) != 1 {
		return "", fmt.Errorf("apt-get download %s produced %d .deb files, want 1", pkg, len(debs))
	}
	dst := filepath.Join(cacheDir, filepath.Base(debs[0]))
	if err := os.Rename(debs[0], dst); err != nil {
		return "", fmt.Errorf("move kernel package into cache: %w", err)
	}
	return dst, nil
}

// cachedDeb finds a previously downloaded .deb for pkg. Versioned kernel
// package names change with every ABI bump, so any match is the right kernel.
func cachedDeb(cacheDir, pkg string) (string, bool) {
	debs, _ := filepath.Glob(filepath.Join(cacheDir, pkg+"_*.deb"))
	sort.Strings(debs)
	for i := len(debs) - 1; i >= 0; i-- {
		if fi, err := os.Stat(debs[i]); err == nil && fi.Mode().IsRegular() && fi.Size() > 0 {
			return debs[i], true
		}
	}
	return "", false
}

// extractDeb unpacks deb into dir with dpkg.
func extractDeb(ctx context.Context, deb, dir string) error {
	if _, err := exec.LookPath("dpkg"); err != nil {
		return fmt.Errorf("dpkg not found: install dpkg: %w", err)
	}
	cmd := exec.CommandContext(ctx, "dpkg", "-x", deb, dir)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("dpkg -x %s: %w: %s", filepath.Base(deb), err, lastLines(out, 3))
	}
	return nil
}

// lastLines keeps error messages short while still showing the tool's own
// explanation.
func lastLines(out []byte, n int) string {
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "; ")
}

// Kernel is an unpacked kernel package.
type Kernel struct {
	Version string // e.g. 6.1.0-57-cloud-amd64
	Vmlinuz string // path of the kernel image
	root    string
}

// ModulesDir is where the package keeps the kernel's modules.
func (k *Kernel) ModulesDir() string {
	return filepath.Join(k.root, "lib", "modules", k.Version)
}

// Close removes the unpacked files.
func (k *Kernel) Close() error { return os.RemoveAll(k.root) }

// Unpack resolves the current cloud kernel, downloads its package into
// cacheDir unless it is there already, and unpacks it below cacheDir. The
// caller closes the Kernel.
func Unpack(ctx context.Context, cacheDir string, progress func(string, ...any)) (*Kernel, error) {
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		return nil, fmt.Errorf("create cache dir: %w", err)
	}
	pkg, err := resolveKernelPackage(ctx)
	if err != nil {
		return nil, err
	}
	deb, err := fetchKernelDeb(ctx, pkg, cacheDir, progress)
	if err != nil {
		return nil, err
	}
	progress("unpacking %s", filepath.Base(deb))
	root, err := os.MkdirTemp(cacheDir, ".unpack-*")
	if err != nil {
		return nil, fmt.Errorf("create unpack dir: %w", err)
	}
	if err := extractDeb(ctx, deb, root); err != nil {
		os.RemoveAll(root)
		return nil, err
	}
	k := &Kernel{Version: strings.TrimPrefix(pkg, "linux-image-"), root: root}
	k.Vmlinuz = filepath.Join(root, "boot", "vmlinuz-"+k.Version)
	if _, err := os.Stat(k.Vmlinuz); err != nil {
		os.RemoveAll(root)
		return nil, fmt.Errorf("kernel package has no boot/vmlinuz-%s: %w", k.Version, err)
	}
	return k, nil
}
