package hostagent

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"

	"github.com/vigil-project/vigil/internal/hostproto"
)

// maxScreenshot bounds a screenshot's PNG (a 4K screen of noise is ~25 MiB;
// real screens compress far better).
const maxScreenshot = 32 << 20

// Screenshot returns a PNG of the VM's display (QMP screendump).
func (a *Agent) Screenshot(ctx context.Context, r hostproto.VMRef) (hostproto.ScreenshotResult, error) {
	v, err := a.get(r.VM)
	if err != nil {
		return hostproto.ScreenshotResult{}, err
	}
	if !v.machine.Display {
		return hostproto.ScreenshotResult{}, fmt.Errorf("%w: %s has no display (the built-in guest has a serial console only: use 'vigil vm console')", ErrInvalid, r.VM)
	}
	p, _, err := v.running()
	if err != nil {
		return hostproto.ScreenshotResult{}, err
	}
	f, err := os.CreateTemp(v.machine.Dir, "screen-*.png")
	if err != nil {
		return hostproto.ScreenshotResult{}, fmt.Errorf("screenshot of %s: %w", r.VM, err)
	}
	path := f.Name()
	f.Close()
	defer os.Remove(path)
	if err := p.Monitor.Run(ctx, "screendump", map[string]any{"filename": path, "format": "png"}, nil); err != nil {
		return hostproto.ScreenshotResult{}, fmt.Errorf("screenshot of %s: %w", r.VM, err)
	}
	st, err := os.Stat(path)
	if err != nil {
		return hostproto.ScreenshotResult{}, fmt.Errorf("screenshot of %s: %w", r.VM, err)
	}
	if st.Size() > maxScreenshot {
		return hostproto.ScreenshotResult{}, fmt.Errorf("screenshot of %s: %d bytes, over the %d-byte limit", r.VM, st.Size(), maxScreenshot)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return hostproto.ScreenshotResult{}, fmt.Errorf("screenshot of %s: %w", r.VM, err)
	}
	return hostproto.ScreenshotResult{PNG: b}, nil
}

// VNC connects to the VM's VNC server, which QEMU keeps on a unix socket
// in the VM's run directory: never a TCP port on the host.
func (a *Agent) VNC(ctx context.Context, r hostproto.VMRef) (io.ReadWriteCloser, error) {
	v, err := a.get(r.VM)
	if err != nil {
		return nil, err
	}
	if !v.machine.Display {
		return nil, fmt.Errorf("%w: %s has no display (the built-in guest has a serial console only: use 'vigil vm console')", ErrInvalid, r.VM)
	}
	if _, _, err := v.running(); err != nil {
		return nil, err
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", v.machine.VNCSocket())
	if err != nil {
		return nil, fmt.Errorf("vnc of %s: %w", r.VM, err)
	}
	return c, nil
}

// Configure changes what the VM's next boot gets: its cloud-init
// configuration, or an ejected CD-ROM (at once, when the VM runs).
func (a *Agent) Configure(ctx context.Context, r hostproto.ConfigureRequest) (hostproto.None, error) {
	v, err := a.get(r.VM)
	if err != nil {
		return none(err)
	}
	defer v.lockOp("configure")()
	if r.Eject && v.spec.ISO == nil {
		return none(fmt.Errorf("%w: %s has no cd-rom to eject", ErrInvalid, r.VM))
	}
	if r.CloudInit != nil && v.spec.CloudInit == nil {
		return none(fmt.Errorf("%w: %s is not configured by cloud-init (only vms from an image are)", ErrInvalid, r.VM))
	}
	if r.Eject {
		if p, _, err := v.running(); err == nil {
			// force: an installer may have locked the tray.
			if err := p.Monitor.Run(ctx, "eject", map[string]any{"id": "cd0", "force": true}, nil); err != nil {
				return none(fmt.Errorf("eject the cd-rom of %s: %w", r.VM, err))
			}
		}
	}
	v.mu.Lock()
	if r.Eject {
		v.spec.Ejected = true
		v.machine.CDROM = ""
	}
	if r.CloudInit != nil {
		ci := *r.CloudInit
		v.spec.CloudInit = &ci
	}
	v.mu.Unlock()
	return none(v.writeSpec())
}

// seedPath is where a VM's cloud-init volume is written for each boot.
func seedPath(dir string) string { return filepath.Join(dir, "seed.iso") }
