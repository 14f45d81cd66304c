package hostagent

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"

	"github.com/vigil-project/vigil/internal/atomicfile"
	"github.com/vigil-project/vigil/internal/cloudinit"
	"github.com/vigil-project/vigil/internal/hostproto"
	"github.com/vigil-project/vigil/internal/imagestore"
	"github.com/vigil-project/vigil/internal/qemu"
)

// ImageSource hands a host the blob of an image it does not have yet
// (from a manager, over the authenticated API; in the dev agent, from the
// manager's store on the same machine).
type ImageSource interface {
	FetchImage(ctx context.Context, digest string, w io.Writer) error
}

// imageLinker is an ImageSource on this machine that can share a blob
// with the host's store instead of copying it.
type imageLinker interface {
	LinkImage(digest string, into *imagestore.Store) error
}

// OVMF's files in Debian's ovmf package.
const (
	ovmfCode = "/usr/share/OVMF/OVMF_CODE_4M.fd"
	ovmfVars = "/usr/share/OVMF/OVMF_VARS_4M.fd"
)

// imageStore is where this host keeps image blobs: in its storage pool
// (the pool's hosts share them), else in its data dir.
func (a *Agent) imageStore() (*imagestore.Store, error) {
	a.imagesOnce.Do(func() {
		dir := filepath.Join(a.cfg.DataDir, "images")
		if a.cfg.StoragePool != "" {
			dir = filepath.Join(a.cfg.StoragePool, "images")
		}
		a.images, a.imagesErr = imagestore.Open(dir)
	})
	return a.images, a.imagesErr
}

// ensureImage makes sure the blob of ref is here (fetching it once even
// when several VMs ask at the same time), and returns its path.
func (a *Agent) ensureImage(ctx context.Context, ref *hostproto.ImageRef) (string, error) {
	if !imagestore.ValidDigest(ref.Digest) {
		return "", fmt.Errorf("%w: image digest %q", ErrInvalid, ref.Digest)
	}
	st, err := a.imageStore()
	if err != nil {
		return "", err
	}
	if st.Has(ref.Digest) {
		return st.Path(ref.Digest), nil
	}
	mu := a.fetchLock(ref.Digest)
	mu.Lock()
	defer mu.Unlock()
	if st.Has(ref.Digest) {
		return st.Path(ref.Digest), nil
	}
	if a.cfg.Images == nil {
		return "", fmt.Errorf("image %s (%s) is not on this host and it has no manager to fetch it from", ref.Name, ref.Digest)
	}
	if l, ok := a.cfg.Images.(imageLinker); ok {
		if err := l.LinkImage(ref.Digest, st); err == nil {
			return st.Path(ref.Digest), nil
		}
	}
	a.log.Info("fetching image", "image", ref.Name, "digest", ref.Digest, "bytes", ref.Size)
	pr, pw := io.Pipe()
	errc := make(chan error, 1)
	go func() { errc <- st.Add(pr, ref.Digest, ref.Size) }()
	ferr := a.cfg.Images.FetchImage(ctx, ref.Digest, pw)
	pw.CloseWithError(ferr)
	if err := <-errc; err != nil {
		return "", fmt.Errorf("fetch image %s: %w", ref.Name, err)
	}
	if ferr != nil {
		return "", fmt.Errorf("fetch image %s: %w", ref.Name, ferr)
	}
	return st.Path(ref.Digest), nil
}

func (a *Agent) fetchLock(digest string) *sync.Mutex {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.fetching == nil {
		a.fetching = map[string]*sync.Mutex{}
	}
	if _, ok := a.fetching[digest]; !ok {
		a.fetching[digest] = &sync.Mutex{}
	}
	return a.fetching[digest]
}

// makeDisk makes a new VM's disk: an empty qcow2, or an overlay on its
// image (a linked clone) grown to the VM's disk size. The overlay names its
// image by a path relative to itself, so it stays valid on every host of a
// pool wherever the pool is mounted.
func (v *vm) makeDisk(ctx context.Context) error {
	if v.spec.Image == nil {
		return qemu.CreateDisk(ctx, v.machine.Disk, v.spec.DiskBytes)
	}
	img, err := v.agent.ensureImage(ctx, v.spec.Image)
	if err != nil {
		return err
	}
	rel, err := filepath.Rel(filepath.Dir(v.machine.Disk), img)
	if err != nil {
		return err
	}
	return qemu.CreateOverlay(ctx, v.machine.Disk, rel, v.spec.Image.Format, v.spec.DiskBytes)
}

// prepareBoot gets what a start needs beyond the disk: the installer ISO,
// the firmware's variables, the cloud-init volume (written afresh, so a
// changed user-data takes effect at this boot).
func (v *vm) prepareBoot(ctx context.Context) error {
	if v.spec.ISO != nil && !v.spec.Ejected {
		p, err := v.agent.ensureImage(ctx, v.spec.ISO)
		if err != nil {
			return err
		}
		v.machine.CDROM = p
	}
	if v.spec.Firmware == qemu.FirmwareUEFI {
		if _, err := os.Stat(v.machine.FirmwareVars); os.IsNotExist(err) {
			b, err := os.ReadFile(ovmfVars)
			if err != nil {
				return fmt.Errorf("uefi firmware: %w (install Debian's ovmf package)", err)
			}
			if err := atomicfile.WriteFile(v.machine.FirmwareVars, b, 0o644); err != nil {
				return err
			}
		}
	}
	if ci := v.spec.CloudInit; ci != nil && v.machine.Seed != "" {
		netConfig := []byte(ci.NetworkConfig)
		if len(netConfig) == 0 && len(v.spec.NICs) > 0 {
			var err error
			if netConfig, err = v.networkConfig(); err != nil {
				return fmt.Errorf("cloud-init volume of %s: %w", v.spec.Name, err)
			}
		}
		seed, err := cloudinit.Seed(cloudinit.Meta{InstanceID: ci.InstanceID, Hostname: v.spec.Name}, []byte(ci.UserData), netConfig)
		if err != nil {
			return fmt.Errorf("cloud-init volume of %s: %w", v.spec.Name, err)
		}
		if err := os.WriteFile(v.machine.Seed, seed, 0o644); err != nil {
			return fmt.Errorf("cloud-init volume of %s: %w", v.spec.Name, err)
		}
	}
	return v.plugNICs()
}

// machineFor is the QEMU definition of a VM with spec, its run files in
// dir and its disk and state in store.
func (a *Agent) machineFor(spec hostproto.VMSpec, dir, store string) qemu.Machine {
	m := qemu.Machine{
		Name: spec.Name, UUID: spec.UUID, MemoryBytes: spec.MemoryBytes, RAMPad: spec.RAMPad, CPUs: spec.CPUs,
		Accel: a.accel, Disk: filepath.Join(store, "disk.qcow2"), HostPort: spec.HostPort, Dir: dir,
		GuestAgent: spec.QGAPort, NICs: a.machineNICs(spec),
	}
	if spec.Image == nil && spec.ISO == nil {
		// The built-in guest boots its kernel directly.
		m.Kernel, m.Initrd = a.cfg.Image.Kernel, a.cfg.Image.Initrd
		m.Cmdline = a.cfg.Image.Cmdline + " vigil.name=" + spec.Name
		if len(spec.NICs) > 0 {
			m.Cmdline += " vigil.net=dhcp"
		}
		return m
	}
	m.Display = true
	if spec.Firmware == qemu.FirmwareUEFI {
		m.Firmware, m.FirmwareCode, m.FirmwareVars = qemu.FirmwareUEFI, ovmfCode, filepath.Join(store, "efivars.fd")
	}
	if spec.CloudInit != nil {
		m.Seed = seedPath(dir)
	}
	if spec.ISO != nil {
		m.CDROMDrive = true
		// The blob is fetched at boot (prepareBoot); its place is known.
		if st, err := a.imageStore(); err == nil && !spec.Ejected {
			m.CDROM = st.Path(spec.ISO.Digest)
		}
	}
	return m
}

// varsSnapshotFile keeps a UEFI VM's firmware variables as they were at
// snapshot snap.
func (v *vm) varsSnapshotFile(snap string) string {
	return filepath.Join(v.storeDir, "snapshots", snap+".efivars.fd")
}

// saveVars copies the firmware's variables into snapshot snap (nothing
// for a BIOS VM, or a UEFI VM never booted).
func (v *vm) saveVars(snap string) error {
	if v.machine.FirmwareVars == "" {
		return nil
	}
	b, err := os.ReadFile(v.machine.FirmwareVars)
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("keep the firmware variables: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(v.varsSnapshotFile(snap)), 0o755); err != nil {
		return err
	}
	return atomicfile.WriteFile(v.varsSnapshotFile(snap), b, 0o644)
}

// restoreVars puts back the firmware's variables of snapshot snap, if it
// has them; QEMU is not running.
func (v *vm) restoreVars(snap string) error {
	if v.machine.FirmwareVars == "" {
		return nil
	}
	b, err := os.ReadFile(v.varsSnapshotFile(snap))
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("restore the firmware variables: %w", err)
	}
	return atomicfile.WriteFile(v.machine.FirmwareVars, b, 0o644)
}
