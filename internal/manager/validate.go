package manager

import (
	"fmt"
	"regexp"

	"github.com/vigil-project/vigil/api"
)

var dnsLabel = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)

// Limits bound what a VM may ask for. "Absurd" requests are refused up
// front with the bound in the message, before anything is created.
type Limits struct {
	MaxMemoryBytes int64 // the host's memory
	MaxCPUs        int
}

const (
	minMemory = 32 << 20
	minDisk   = 16 << 20
	maxDisk   = 64 << 40
)

func validName(name string) error {
	if !dnsLabel.MatchString(name) {
		return errorf(ErrInvalid, "invalid vm name %q: it must be a DNS label of 1-63 lower-case letters, digits and '-', starting and ending with a letter or digit", name)
	}
	return nil
}

func validateCreate(r api.VMCreateRequest, lim Limits) error {
	if err := validName(r.Name); err != nil {
		return err
	}
	switch {
	case r.MemoryBytes < minMemory:
		return errorf(ErrInvalid, "memory %s is too small: give at least %s (e.g. --memory 128M)", size(r.MemoryBytes), size(minMemory))
	case lim.MaxMemoryBytes > 0 && r.MemoryBytes > lim.MaxMemoryBytes:
		return errorf(ErrInvalid, "memory %s is more than the host has (%s): ask for less", size(r.MemoryBytes), size(lim.MaxMemoryBytes))
	case r.CPUs < 1:
		return errorf(ErrInvalid, "%d cpus: give at least 1 (e.g. --cpus 1)", r.CPUs)
	case lim.MaxCPUs > 0 && r.CPUs > lim.MaxCPUs:
		return errorf(ErrInvalid, "%d cpus is more than allowed on this host (%d): ask for fewer", r.CPUs, lim.MaxCPUs)
	case r.DiskBytes < minDisk && !(r.Image != "" && r.DiskBytes == 0):
		return errorf(ErrInvalid, "disk %s is too small: give at least %s (e.g. --disk 256M)", size(r.DiskBytes), size(minDisk))
	case r.DiskBytes > maxDisk:
		return errorf(ErrInvalid, "disk %s is larger than the %s limit", size(r.DiskBytes), size(maxDisk))
	case r.Image != "" && r.ISO != "":
		return errorf(ErrInvalid, "give --image (a disk image to run) or --iso (an installer), not both")
	case r.Firmware != "" && r.Firmware != "bios" && r.Firmware != "uefi":
		return errorf(ErrInvalid, "unknown firmware %q: use bios or uefi", r.Firmware)
	case r.Image == "" && r.ISO == "" && r.Firmware == "uefi":
		return errorf(ErrInvalid, "the built-in guest boots its kernel directly: --firmware goes with --image or --iso")
	case r.Image == "" && (r.UserData != "" || len(r.SSHKeys) > 0):
		return errorf(ErrInvalid, "user-data and ssh keys are for cloud-init in a VM from an --image")
	case r.UserData != "" && len(r.SSHKeys) > 0:
		return errorf(ErrInvalid, "give --user-data or --ssh-key, not both (put the keys in your user-data)")
	}
	return nil
}

// size prints bytes with a binary unit, the way the CLI accepts them.
func size(b int64) string {
	const unit = 1024
	if b < unit {
		return fmt.Sprintf("%dB", b)
	}
	units := "KMGTPE"
	v, i := float64(b)/unit, 0
	for v >= unit && i < len(units)-1 {
		v /= unit
		i++
	}
	if v == float64(int64(v)) {
		return fmt.Sprintf("%d%ciB", int64(v), units[i])
	}
	return fmt.Sprintf("%.1f%ciB", v, units[i])
}
