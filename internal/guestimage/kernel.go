package guestimage

import (
	"bufio"
	"bytes"
	"context"
	"debug/elf"
	"errors"
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

// locateKernel returns the kernel image and module paths inside an unpacked
// kernel package, failing with the name of the first missing module.
func locateKernel(root, version string) (vmlinuz string, modules map[string]string, err error) {
	vmlinuz = filepath.Join(root, "boot", "vmlinuz-"+version)
	if _, err := os.Stat(vmlinuz); err != nil {
		return "", nil, fmt.Errorf("kernel package has no boot/vmlinuz-%s: %w", version, err)
	}
	modules = make(map[string]string)
	base := filepath.Join(root, "lib", "modules", version, "kernel")
	for _, m := range guestModules() {
		p := filepath.Join(base, filepath.FromSlash(m)+".ko")
		if _, err := os.Stat(p); err != nil {
			return "", nil, fmt.Errorf("kernel %s lacks required module %s.ko (compressed or renamed?): %w", version, m, err)
		}
		modules[m] = p
	}
	return vmlinuz, modules, nil
}

// checkStatic fails unless path is an ELF executable without a program
// interpreter: the initramfs has no dynamic loader or C library.
func checkStatic(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return fmt.Errorf("open %s as ELF: %w", path, err)
	}
	defer f.Close()
	if f.Machine != elf.EM_X86_64 {
		return fmt.Errorf("%s is built for %s, want x86-64", path, f.Machine)
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("%s is dynamically linked", path)
		}
	}
	return nil
}

// checkBusybox verifies that path is a usable static busybox.
func checkBusybox(path string) error {
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("%s not found: install busybox-static (apt-get install busybox-static)", path)
	}
	if err := checkStatic(path); err != nil {
		return fmt.Errorf("busybox is not usable in the guest, install busybox-static (apt-get install busybox-static): %w", err)
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
