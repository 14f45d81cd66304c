// Package hostimage builds the image a stateless Vigil host boots from the
// network: Debian's cloud kernel and an initramfs holding busybox, vigil,
// QEMU with its libraries and firmware, Vigil's built-in guest image, and
// the cluster CA certificate that the host's configuration must chain to.
// An image is named by its digest (sha256 of its kernel and initramfs), so
// a host can say exactly what it runs.
package hostimage

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"time"

	"github.com/pierrec/lz4/v4"

	"github.com/vigil-project/vigil/internal/atomicfile"
	"github.com/vigil-project/vigil/internal/cpio"
	"github.com/vigil-project/vigil/internal/debkernel"
	"github.com/vigil-project/vigil/internal/pki"
	"github.com/vigil-project/vigil/internal/qemu"
)

// Options configures Build.
type Options struct {
	Dir        string // images go to Dir/DIGEST
	CacheDir   string // the kernel package download cache
	Vigil      string // the vigil binary to boot (its libraries come along)
	GuestImage string // Vigil's built-in guest image directory, for the host's VMs
	CACert     []byte // PEM: the cluster CA the host trusts
	Progress   io.Writer
}

// Image describes a built image. Kernel and Initrd are file names in its
// directory.
type Image struct {
	Digest        string    `json:"digest"` // sha256:HEX
	Kernel        string    `json:"kernel"`
	Initrd        string    `json:"initrd"`
	KernelVersion string    `json:"kernel_version"`
	QEMUVersion   string    `json:"qemu_version"`
	CAFingerprint string    `json:"ca_fingerprint"`
	Bytes         int64     `json:"bytes"` // kernel plus initramfs
	BuiltAt       time.Time `json:"built_at"`
	// Dir is where the image is (not stored).
	Dir string `json:"-"`
}

const (
	manifestName = "manifest.json"
	kernelName   = "vmlinuz"
	initrdName   = "initrd.img"
	busyboxPath  = "/bin/busybox"
	// GuestImageDir is where the built-in guest image is inside the host.
	GuestImageDir = "/var/lib/vigil/guest"
	// CAPath is where the cluster CA certificate is inside the host.
	CAPath = "/etc/vigil/ca.pem"
	// QEMUVersionPath holds the version of the QEMU the image carries (as
	// qemu.BinaryVersion says it), so the host need not run it to know.
	QEMUVersionPath = "/etc/vigil/qemu-version"
	// GuestKernelSumPath, when the guest runs the host's kernel, holds
	// its sha256 (hex): the host fetches GuestImageDir/vmlinuz at boot.
	GuestKernelSumPath = "/etc/vigil/guest-kernel.sha256"
)

// hostModules are the kernel modules a host loads (with their
// dependencies): its NIC and disks, taps, bridges, VXLAN and nftables.
var hostModules = []string{
	"virtio_pci", "virtio_net", "virtio_blk", "tun", "bridge", "veth", "vxlan",
	"nf_tables", "nft_chain_nat", "nft_nat", "nft_masq", "nft_ct", "nft_meta_bridge", "nft_reject_inet",
}

// programs are the build machine's programs the host runs, with their
// libraries.
var programs = []string{"/usr/bin/qemu-system-x86_64", "/usr/bin/qemu-img"}

// firmware are the directories QEMU loads BIOS and option ROMs from.
var firmware = []string{"/usr/share/qemu", "/usr/share/seabios", "/usr/lib/ipxe/qemu"}

// otherArches are firmware files in /usr/share/qemu for machines other
// than x86 PCs: left out (several MiB a host would load over the network
// at every boot for nothing).
var otherArches = []string{"openbios-*", "skiboot.lid", "slof.bin", "s390-*", "opensbi-*", "hppa-firmware*",
	"palcode-*", "npcm7xx*", "QEMU,*", "*.dtb", "vof.bin", "u-boot*", "petalogix*", "trace-events-all"}

var digestRE = regexp.MustCompile(`^sha256:[0-9a-f]{64}$`)

// ValidDigest tells whether s has the form of an image digest.
func ValidDigest(s string) bool { return digestRE.MatchString(s) }

// Build makes an image and returns it. Building the same inputs again
// gives the same digest.
func Build(ctx context.Context, o Options) (*Image, error) {
	progress := func(format string, args ...any) {
		if o.Progress != nil {
			fmt.Fprintf(o.Progress, format+"\n", args...)
		}
	}
	if o.Dir == "" || o.CacheDir == "" || o.Vigil == "" || o.GuestImage == "" || len(o.CACert) == 0 {
		return nil, errors.New("build host image: Dir, CacheDir, Vigil, GuestImage and CACert are required")
	}
	ca, err := parseCA(o.CACert)
	if err != nil {
		return nil, err
	}
	k, err := debkernel.Unpack(ctx, o.CacheDir, progress)
	if err != nil {
		return nil, err
	}
	defer k.Close()
	mods, err := k.Modules(hostModules...)
	if err != nil {
		return nil, fmt.Errorf("host image: kernel %s: %w", k.Version, err)
	}

	t := newTree()
	if _, err := os.Stat(busyboxPath); err != nil {
		return nil, fmt.Errorf("host image: %s not found: install busybox-static", busyboxPath)
	}
	if err := t.copyFile(busyboxPath, "bin/busybox"); err != nil {
		return nil, err
	}
	for _, a := range applets {
		t.symlinks["bin/"+a] = "busybox"
	}
	t.symlinks["init"] = "bin/busybox"
	if err := t.copyProgram(ctx, o.Vigil); err != nil {
		return nil, err
	}
	if o.Vigil != "/bin/vigil" {
		t.files["bin/vigil"] = t.files[imagePath(o.Vigil)]
		t.modes["bin/vigil"] = 0o755
		delete(t.files, imagePath(o.Vigil))
	}
	for _, p := range programs {
		if err := t.copyProgram(ctx, p); err != nil {
			return nil, fmt.Errorf("%w (install qemu-system-x86 and qemu-utils)", err)
		}
	}
	for _, d := range firmware {
		if err := t.copyDir(d, otherArches); err != nil {
			return nil, err
		}
	}
	// The built-in guest usually runs the host's own kernel: then it is
	// not in the initramfs twice (14 MiB that do not compress, about half
	// a second of every boot under TCG); the host fetches it from the
	// boot service and checks it against the sum kept here.
	sameKernel, hostKernelSum, err := sameFile(filepath.Join(o.GuestImage, "vmlinuz"), k.Vmlinuz)
	if err != nil {
		return nil, fmt.Errorf("%w (build the guest image first: vigil image build)", err)
	}
	for _, f := range []string{"vmlinuz", "initrd.img", "manifest.json"} {
		if f == "vmlinuz" && sameKernel {
			t.add(GuestKernelSumPath, 0o644, []byte(hostKernelSum+"\n"))
			continue
		}
		if err := t.copyFile(filepath.Join(o.GuestImage, f), filepath.Join(GuestImageDir, f)); err != nil {
			return nil, fmt.Errorf("%w (build the guest image first: vigil image build)", err)
		}
	}
	for _, m := range mods {
		if err := t.copyFile(filepath.Join(k.ModulesDir(), m), filepath.Join("lib/modules", k.Version, m)); err != nil {
			return nil, err
		}
	}
	t.add(CAPath, 0o644, o.CACert)
	if v := qemu.BinaryVersion(programs[0]); v != "" {
		t.add(QEMUVersionPath, 0o644, []byte(v+"\n"))
	}
	t.add("etc/inittab", 0o644, []byte(inittab))
	t.add("etc/init.d/rcS", 0o755, []byte(rcS(k.Version, mods)))
	t.add("etc/udhcpc.script", 0o755, []byte(udhcpcScript))
	t.add("etc/passwd", 0o644, []byte("root:x:0:0:root:/root:/bin/sh\n"))
	t.add("etc/group", 0o644, []byte("root:x:0:\n"))

	if err := os.MkdirAll(o.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("create image dir: %w", err)
	}
	stage, err := os.MkdirTemp(o.Dir, ".build-*")
	if err != nil {
		return nil, fmt.Errorf("create staging dir: %w", err)
	}
	defer os.RemoveAll(stage)
	if err := os.Chmod(stage, 0o755); err != nil {
		return nil, err
	}
	progress("writing the initramfs (%d files, %d modules)", len(t.files)+len(t.made), len(mods))
	if err := writeInitramfs(filepath.Join(stage, initrdName), t); err != nil {
		return nil, err
	}
	if err := copyFileSync(k.Vmlinuz, filepath.Join(stage, kernelName)); err != nil {
		return nil, err
	}
	digest, size, err := digestOf(filepath.Join(stage, kernelName), filepath.Join(stage, initrdName))
	if err != nil {
		return nil, err
	}
	img := &Image{Digest: digest, Kernel: kernelName, Initrd: initrdName, KernelVersion: k.Version,
		QEMUVersion: qemuVersion(ctx), CAFingerprint: ca, Bytes: size, BuiltAt: time.Now().UTC().Truncate(time.Second)}
	b, err := json.MarshalIndent(img, "", "  ")
	if err != nil {
		return nil, err
	}
	if err := atomicfile.WriteFile(filepath.Join(stage, manifestName), append(b, '\n'), 0o644); err != nil {
		return nil, err
	}
	dst := filepath.Join(o.Dir, hexOf(digest))
	if _, err := os.Stat(dst); err == nil {
		progress("host image %s already there", digest)
		return Load(dst)
	}
	if err := os.Rename(stage, dst); err != nil {
		return nil, fmt.Errorf("move the image into place: %w", err)
	}
	progress("host image %s ready in %s (%d MiB)", digest, dst, size>>20)
	return Load(dst)
}

// sameFile tells whether files a and b have the same content, and b's
// sha256 (hex).
func sameFile(a, b string) (bool, string, error) {
	sum := func(p string) (string, error) {
		f, err := os.Open(p)
		if err != nil {
			return "", err
		}
		defer f.Close()
		h := sha256.New()
		if _, err := io.Copy(h, f); err != nil {
			return "", err
		}
		return hex.EncodeToString(h.Sum(nil)), nil
	}
	sa, err := sum(a)
	if err != nil {
		return false, "", err
	}
	sb, err := sum(b)
	if err != nil {
		return false, "", err
	}
	return sa == sb, sb, nil
}

func hexOf(digest string) string { return strings.TrimPrefix(digest, "sha256:") }

// Path is the directory of the image with digest under dir.
func Path(dir, digest string) string { return filepath.Join(dir, hexOf(digest)) }

// Load reads the image in dir and checks its files against its digest.
func Load(dir string) (*Image, error) {
	b, err := os.ReadFile(filepath.Join(dir, manifestName))
	if err != nil {
		return nil, fmt.Errorf("host image in %s: %w", dir, err)
	}
	var img Image
	if err := json.Unmarshal(b, &img); err != nil {
		return nil, fmt.Errorf("host image in %s: bad manifest: %w", dir, err)
	}
	if img.Kernel != kernelName || img.Initrd != initrdName || !ValidDigest(img.Digest) {
		return nil, fmt.Errorf("host image in %s: bad manifest", dir)
	}
	img.Dir = dir
	return &img, nil
}

// Verify recomputes the image's digest from its files.
func (img *Image) Verify() error {
	d, _, err := digestOf(filepath.Join(img.Dir, img.Kernel), filepath.Join(img.Dir, img.Initrd))
	if err != nil {
		return err
	}
	if d != img.Digest {
		return fmt.Errorf("host image %s: its files hash to %s (damaged or changed)", img.Digest, d)
	}
	return nil
}

// List returns the images under dir, newest first.
func List(dir string) ([]*Image, error) {
	ents, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []*Image
	for _, e := range ents {
		if !e.IsDir() || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		if img, err := Load(filepath.Join(dir, e.Name())); err == nil {
			out = append(out, img)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].BuiltAt.After(out[j].BuiltAt) })
	return out, nil
}

// digestOf is sha256 over the kernel's length and bytes, then the
// initramfs's.
func digestOf(kernel, initrd string) (string, int64, error) {
	h := sha256.New()
	var total int64
	for _, p := range []string{kernel, initrd} {
		f, err := os.Open(p)
		if err != nil {
			return "", 0, err
		}
		st, err := f.Stat()
		if err != nil {
			f.Close()
			return "", 0, err
		}
		fmt.Fprintf(h, "%d\n", st.Size())
		n, err := io.Copy(h, f)
		f.Close()
		if err != nil {
			return "", 0, err
		}
		total += n
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil)), total, nil
}

// writeInitramfs writes t as an LZ4-compressed newc archive, in LZ4's
// legacy frames (the only ones the kernel's unpacker reads). LZ4 over
// zstd: under TCG the kernel unpacked this image in about 1 s against
// 2-2.8 s for zstd, and the larger file costs less than that over HTTP
// (docs/benchmarks.md, network boot by stage).
func writeInitramfs(dst string, t *tree) error {
	f, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	zw := lz4.NewWriter(f)
	if err := zw.Apply(lz4.LegacyOption(true), lz4.CompressionLevelOption(lz4.Level9)); err != nil {
		return err
	}
	c := cpio.NewWriter(zw)
	dirs, entries := t.paths()
	isDir := map[string]bool{}
	for _, d := range append([]string{"dev", "proc", "sys", "run", "tmp", "root", "var", "var/log"}, dirs...) {
		if !isDir[d] {
			isDir[d] = true
			c.Dir(d, 0o755)
		}
	}
	// The kernel opens /dev/console for init before devtmpfs is mounted.
	c.CharDev("dev/console", 0o600, 5, 1)
	c.CharDev("dev/null", 0o666, 1, 3)
	for _, p := range entries {
		switch {
		case isDir[p]:
			continue // a directory symlink on the build machine
		case t.made[p] != nil:
			c.File(p, t.modes[p], t.made[p])
		case t.symlinks[p] != "":
			c.Symlink(p, t.symlinks[p])
		default:
			b, err := os.ReadFile(t.files[p])
			if err != nil {
				return fmt.Errorf("host image: %w", err)
			}
			c.File(p, t.modes[p], b)
		}
	}
	if err := c.Close(); err != nil {
		return fmt.Errorf("host image: %w", err)
	}
	if err := zw.Close(); err != nil {
		return fmt.Errorf("host image: lz4: %w", err)
	}
	return f.Sync()
}

func copyFileSync(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	if err := out.Sync(); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// parseCA returns the fingerprint of the PEM CA certificate.
func parseCA(pemBytes []byte) (string, error) {
	c, err := pki.ParseCert(pemBytes)
	if err != nil {
		return "", fmt.Errorf("host image: the cluster CA certificate: %w", err)
	}
	return pki.Fingerprint(c), nil
}

// qemuVersion is the first line of qemu-system-x86_64 --version.
func qemuVersion(ctx context.Context) string {
	out, err := exec.CommandContext(ctx, programs[0], "--version").Output()
	if err != nil {
		return ""
	}
	line, _, _ := strings.Cut(string(out), "\n")
	return strings.TrimSpace(line)
}
