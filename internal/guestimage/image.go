// Package guestimage builds and loads Vigil's default guest image: a Debian
// cloud kernel plus a small busybox initramfs that carries the vigil-guest
// agent.
package guestimage

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/vigil-project/vigil/internal/debkernel"

	"github.com/vigil-project/vigil/internal/atomicfile"
)

// ErrNotBuilt is wrapped by Load when the image directory has no complete
// image.
var ErrNotBuilt = errors.New("guest image not built")

// Options configures Build and Ensure.
type Options struct {
	Dir        string    // output dir, e.g. <data-dir>/images/default
	CacheDir   string    // download cache (the kernel .deb), e.g. <data-dir>/images/cache
	GuestAgent string    // path to the static vigil-guest binary to embed
	Progress   io.Writer // human progress lines; may be nil
}

// Image describes a built image. In the manifest, Kernel and Initrd are file
// names relative to the image directory so the directory can be moved; Load
// and Build return them as paths joined with the directory.
type Image struct {
	Kernel        string    `json:"kernel"`
	Initrd        string    `json:"initrd"`
	Cmdline       string    `json:"cmdline"`
	KernelVersion string    `json:"kernel_version"`
	AgentSHA256   string    `json:"agent_sha256"`
	BuiltAt       time.Time `json:"built_at"`
	// Format is the layout of the initramfs (init scripts, modules); an
	// image of another format is rebuilt.
	Format int `json:"format"`
}

// Format is bumped whenever the initramfs contents change in a way that an
// existing image must be rebuilt for (rcS, inittab, module list, kernel
// command line).
const Format = 3

const (
	manifestName = "manifest.json"
	kernelName   = "vmlinuz"
	initrdName   = "initrd.img"
	// busyboxPath is where Debian's busybox-static installs its binary.
	busyboxPath = "/bin/busybox"
)

// Build fetches the kernel and builds the image into o.Dir, replacing any
// image there. The new image is assembled in a temporary directory beside
// o.Dir and renamed into place, so o.Dir never holds a partial image.
func Build(ctx context.Context, o Options) (*Image, error) {
	return build(ctx, o, busyboxPath)
}

func build(ctx context.Context, o Options, busybox string) (*Image, error) {
	if o.Dir == "" || o.CacheDir == "" || o.GuestAgent == "" {
		return nil, errors.New("build guest image: Dir, CacheDir and GuestAgent are required")
	}
	progress := func(format string, args ...any) {
		if o.Progress != nil {
			fmt.Fprintf(o.Progress, format+"\n", args...)
		}
	}
	if err := checkStatic(o.GuestAgent); err != nil {
		return nil, fmt.Errorf("guest agent must be a static x86-64 binary (build with CGO_ENABLED=0): %w", err)
	}
	agentSum, err := fileSHA256(o.GuestAgent)
	if err != nil {
		return nil, err
	}
	if err := checkBusybox(busybox); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(o.CacheDir, 0o755); err != nil {
		return nil, fmt.Errorf("create cache dir: %w", err)
	}

	k, err := debkernel.Unpack(ctx, o.CacheDir, progress)
	if err != nil {
		return nil, err
	}
	defer k.Close()
	version := k.Version
	modules, err := locateModules(k.ModulesDir())
	if err != nil {
		return nil, fmt.Errorf("kernel %s: %w", version, err)
	}
	vmlinuz := k.Vmlinuz

	parent := filepath.Dir(filepath.Clean(o.Dir))
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return nil, fmt.Errorf("create image parent dir: %w", err)
	}
	stage, err := os.MkdirTemp(parent, "."+filepath.Base(o.Dir)+".build-*")
	if err != nil {
		return nil, fmt.Errorf("create staging dir: %w", err)
	}
	defer os.RemoveAll(stage) // a no-op once the stage has been renamed
	// MkdirTemp creates 0700; QEMU may run as another user and must read
	// the image.
	if err := os.Chmod(stage, 0o755); err != nil {
		return nil, fmt.Errorf("chmod staging dir: %w", err)
	}

	if err := copyFile(vmlinuz, filepath.Join(stage, kernelName)); err != nil {
		return nil, err
	}
	progress("writing initramfs (%d modules)", len(modules))
	spec := initramfsSpec{KernelVersion: version, Busybox: busybox, Agent: o.GuestAgent, Modules: modules}
	if err := writeFileSync(filepath.Join(stage, initrdName), func(w io.Writer) error {
		return writeInitramfs(w, spec)
	}); err != nil {
		return nil, fmt.Errorf("write initramfs: %w", err)
	}
	img := &Image{
		Kernel:        kernelName,
		Initrd:        initrdName,
		Cmdline:       DefaultCmdline,
		KernelVersion: version,
		AgentSHA256:   agentSum,
		Format:        Format,
		BuiltAt:       time.Now().UTC().Truncate(time.Second),
	}
	if err := saveManifest(stage, img); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := replaceDir(stage, o.Dir); err != nil {
		return nil, err
	}
	progress("guest image ready in %s (kernel %s)", o.Dir, version)
	return Load(o.Dir)
}

// Load reads dir's manifest and checks that the files it names exist.
func Load(dir string) (*Image, error) {
	b, err := os.ReadFile(filepath.Join(dir, manifestName))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: no manifest in %s", ErrNotBuilt, dir)
	}
	if err != nil {
		return nil, fmt.Errorf("read guest image manifest: %w", err)
	}
	var img Image
	if err := json.Unmarshal(b, &img); err != nil {
		return nil, fmt.Errorf("parse guest image manifest %s: %w", filepath.Join(dir, manifestName), err)
	}
	if img.Kernel == "" || img.Initrd == "" {
		return nil, fmt.Errorf("%w: manifest in %s names no kernel or initrd", ErrNotBuilt, dir)
	}
	for _, p := range []*string{&img.Kernel, &img.Initrd} {
		if !filepath.IsAbs(*p) {
			*p = filepath.Join(dir, *p)
		}
		if _, err := os.Stat(*p); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrNotBuilt, err)
		}
	}
	return &img, nil
}

// Ensure returns the image in o.Dir, building it first when it is missing,
// unreadable, or was built with a different guest agent binary.
func Ensure(ctx context.Context, o Options) (*Image, error) {
	img, loadErr := Load(o.Dir)
	sum, err := fileSHA256(o.GuestAgent)
	if err != nil {
		return nil, err
	}
	rebuild, why := needsRebuild(img, loadErr, sum)
	if !rebuild {
		return img, nil
	}
	if o.Progress != nil {
		fmt.Fprintf(o.Progress, "building guest image: %s\n", why)
	}
	return Build(ctx, o)
}

// needsRebuild decides whether Ensure must build. Any load failure leads to
// a rebuild: a corrupt manifest is as unusable as a missing one, and Build
// reports a clearer error if the problem persists.
func needsRebuild(img *Image, loadErr error, agentSum string) (bool, string) {
	switch {
	case errors.Is(loadErr, ErrNotBuilt):
		return true, "no image yet"
	case loadErr != nil:
		return true, fmt.Sprintf("existing image unusable: %v", loadErr)
	case img.Format != Format:
		return true, fmt.Sprintf("image format %d is not the current %d", img.Format, Format)
	case img.AgentSHA256 != agentSum:
		return true, "guest agent changed"
	default:
		return false, ""
	}
}

// saveManifest writes dir/manifest.json atomically.
func saveManifest(dir string, img *Image) error {
	b, err := json.MarshalIndent(img, "", "  ")
	if err != nil {
		return fmt.Errorf("encode manifest: %w", err)
	}
	return atomicfile.WriteFile(filepath.Join(dir, manifestName), append(b, '\n'), 0o644)
}

// replaceDir moves the complete image in stage to dst. An existing dst is
// first moved aside so that dst is at all times either the old image, absent,
// or the new image; it is restored if the final rename fails.
func replaceDir(stage, dst string) error {
	old := stage + ".old"
	hadOld := false
	if err := os.Rename(dst, old); err == nil {
		hadOld = true
	} else if !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("move old image aside: %w", err)
	}
	if err := os.Rename(stage, dst); err != nil {
		if hadOld {
			if rerr := os.Rename(old, dst); rerr != nil {
				return fmt.Errorf("install image: %w (and restoring the old image failed: %v)", err, rerr)
			}
		}
		return fmt.Errorf("install image: %w", err)
	}
	if hadOld {
		if err := os.RemoveAll(old); err != nil {
			return fmt.Errorf("remove old image: %w", err)
		}
	}
	return syncDir(filepath.Dir(dst))
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}

// writeFileSync creates path, fills it with fill and fsyncs it.
func writeFileSync(path string, fill func(io.Writer) error) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	bw := bufio.NewWriterSize(f, 1<<20)
	err = fill(bw)
	if err == nil {
		err = bw.Flush()
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("copy %s: %w", filepath.Base(src), err)
	}
	defer in.Close()
	if err := writeFileSync(dst, func(w io.Writer) error {
		_, err := io.Copy(w, in)
		return err
	}); err != nil {
		return fmt.Errorf("copy %s: %w", filepath.Base(src), err)
	}
	return nil
}

func fileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("hash guest agent: %w", err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("hash guest agent: %w", err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
