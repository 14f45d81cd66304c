// Package qemu builds QEMU command lines and supervises QEMU processes that
// outlive the agent that started them: each process is daemonized, leaves a
// pid file and a QMP socket in its VM directory, and can be re-adopted.
package qemu

import (
	"errors"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
)

// Machine is everything needed to run one VM's QEMU process.
type Machine struct {
	Name        string
	UUID        string
	MemoryBytes int64
	// RAMPad gives the guest RAMPadKiB more RAM than MemoryBytes, so that
	// its RAM is not a multiple of 256 KiB: see LivePrecopySafe.
	RAMPad bool
	CPUs   int
	Accel  string // kvm or tcg, already resolved
	// Kernel, Initrd and Cmdline boot Vigil's built-in guest directly;
	// without them the machine boots from its disk (or CDROM) through its
	// firmware, as a user's own OS image does.
	Kernel  string
	Initrd  string
	Cmdline string
	Disk    string // qcow2 image, attached as virtio-blk node "disk0"
	// Firmware is "bios" (SeaBIOS, the default) or "uefi" (OVMF: FirmwareCode
	// read-only, FirmwareVars the VM's own writable variables).
	Firmware     string
	FirmwareCode string
	FirmwareVars string
	// CDROMDrive adds a CD-ROM drive, booted when the disk is not bootable
	// (an installer); CDROM is the ISO in it, read-only, or empty once
	// ejected (the drive stays, so saved states still match).
	CDROMDrive bool
	CDROM      string
	// Seed, if set, is a cloud-init NoCloud volume attached read-only.
	Seed string
	// GuestAgent adds the port of QEMU's own guest agent
	// (org.qemu.guest_agent.0) for guests that run qemu-guest-agent.
	GuestAgent bool
	// Display adds a standard VGA card and a VNC server on a unix socket
	// in Dir (never a TCP port), for installers and graphical consoles.
	Display  bool
	HostPort int // 127.0.0.1:HostPort is forwarded to the guest's port 80
	// NICs, if any, replace user-mode networking: one virtio NIC per tap
	// (made and wired by the host agent), nic0 first.
	NICs []NIC
	Dir  string // holds the sockets, serial log and pid file
	// Incoming starts QEMU waiting for a saved state (-incoming defer)
	// instead of booting; LoadState or MigrateIncoming then feeds it.
	Incoming bool
	// NoHostFwd leaves out the forward of HostPort: the destination of a
	// live migration adds it (AddHostFwd) once the source has let go of
	// the port.
	NoHostFwd bool
}

// NIC is a virtio network card on a tap.
type NIC struct {
	Tap string
	MAC string
	// Vhost moves the card's data path into the kernel (vhost-net), where
	// the host has it.
	Vhost bool
}

// Hardware is the part of a machine that a saved state depends on: QEMU
// refuses (or worse, misreads) a migration stream from a machine with other
// memory, CPUs or devices. It is recorded in state files and compared on load.
type Hardware struct {
	MachineType string   `json:"machine_type"`
	CPUModel    string   `json:"cpu_model"`
	MemoryBytes int64    `json:"memory_bytes"`
	RAMPadKiB   int64    `json:"ram_pad_kib,omitempty"`
	CPUs        int      `json:"cpus"`
	Devices     []string `json:"devices"`
}

// RAMPadKiB is how much RAM a machine with RAMPad has above its size: a
// multiple of the 8 KiB QEMU rounds RAM to, and not of 256 KiB.
const RAMPadKiB = 8

func (m Machine) ramPadKiB() int64 {
	if m.RAMPad {
		return RAMPadKiB
	}
	return 0
}

// machineType and devices must change together with Args.
const machineType = "q35"

var devices = []string{"virtio-blk-pci:vda", "virtio-net-pci:nic0", "virtio-serial-pci:vser0", "virtserialport:org.vigil.agent.0", "pvpanic-pci"}

// Hardware describes m's hardware.
func (m Machine) Hardware() Hardware {
	d := append([]string(nil), devices...)
	if m.GuestAgent {
		d = append(d, "virtserialport:org.qemu.guest_agent.0")
	}
	for i := 1; i < len(m.NICs); i++ {
		d = append(d, "virtio-net-pci:nic"+strconv.Itoa(i))
	}
	if m.Seed != "" {
		d = append(d, "virtio-blk-pci:vdb")
	}
	if m.CDROMDrive {
		d = append(d, "ide-cd:cd0")
	}
	if m.Display {
		d = append(d, "VGA")
	}
	if m.Firmware == FirmwareUEFI {
		d = append(d, "pflash:uefi")
	}
	return Hardware{MachineType: machineType, CPUModel: cpuModel(m.Accel), MemoryBytes: m.MemoryBytes, RAMPadKiB: m.ramPadKiB(), CPUs: m.CPUs, Devices: d}
}

// Firmwares.
const (
	FirmwareBIOS = "bios"
	FirmwareUEFI = "uefi"
)

// Diff lists how h differs from other, in words; empty when they match.
func (h Hardware) Diff(other Hardware) []string {
	var d []string
	if h.MachineType != other.MachineType {
		d = append(d, fmt.Sprintf("machine type %s vs %s", h.MachineType, other.MachineType))
	}
	if h.CPUModel != other.CPUModel {
		d = append(d, fmt.Sprintf("cpu model %s vs %s", h.CPUModel, other.CPUModel))
	}
	if h.MemoryBytes != other.MemoryBytes {
		d = append(d, fmt.Sprintf("memory %d MiB vs %d MiB", h.MemoryBytes>>20, other.MemoryBytes>>20))
	}
	if h.RAMPadKiB != other.RAMPadKiB {
		d = append(d, fmt.Sprintf("%d KiB of RAM above it vs %d", h.RAMPadKiB, other.RAMPadKiB))
	}
	if h.CPUs != other.CPUs {
		d = append(d, fmt.Sprintf("%d cpus vs %d", h.CPUs, other.CPUs))
	}
	if strings.Join(h.Devices, ",") != strings.Join(other.Devices, ",") {
		d = append(d, fmt.Sprintf("devices [%s] vs [%s]", strings.Join(h.Devices, " "), strings.Join(other.Devices, " ")))
	}
	return d
}

// Paths of the per-VM runtime files.
func (m Machine) QMPSocket() string   { return filepath.Join(m.Dir, "qmp.sock") }
func (m Machine) AgentSocket() string { return filepath.Join(m.Dir, "agent.sock") }
func (m Machine) SerialLog() string   { return filepath.Join(m.Dir, "serial.log") }
func (m Machine) PIDFile() string     { return filepath.Join(m.Dir, "qemu.pid") }
func (m Machine) LogFile() string     { return filepath.Join(m.Dir, "qemu.log") }
func (m Machine) QGASocket() string   { return filepath.Join(m.Dir, "qga.sock") }
func (m Machine) VNCSocket() string   { return filepath.Join(m.Dir, "vnc.sock") }

// unixPathMax is sun_path's size on Linux, including the terminating NUL.
const unixPathMax = 108

// Validate reports a definition QEMU would reject, in words an operator can act on.
func (m Machine) Validate() error {
	switch {
	case m.Name == "":
		return errors.New("machine has no name")
	case m.MemoryBytes < 16<<20:
		return fmt.Errorf("memory %d bytes is too small: give at least 16 MiB", m.MemoryBytes)
	case m.CPUs < 1:
		return fmt.Errorf("%d cpus: give at least 1", m.CPUs)
	case m.Accel != AccelKVM && m.Accel != AccelTCG:
		return fmt.Errorf("accelerator %q is not resolved: use kvm or tcg", m.Accel)
	case (m.Kernel == "") != (m.Initrd == ""):
		return errors.New("a direct kernel boot needs both a kernel and an initrd: build the built-in image with 'vigil image build'")
	case m.Firmware != "" && m.Firmware != FirmwareBIOS && m.Firmware != FirmwareUEFI:
		return fmt.Errorf("firmware %q: use bios or uefi", m.Firmware)
	case m.CDROM != "" && !m.CDROMDrive:
		return fmt.Errorf("an iso (%s) needs a cd-rom drive", m.CDROM)
	case m.Firmware == FirmwareUEFI && (m.FirmwareCode == "" || m.FirmwareVars == ""):
		return errors.New("uefi needs OVMF: install it with 'apt-get install ovmf'")
	case m.Disk == "":
		return errors.New("machine has no disk")
	case len(m.NICs) == 0 && (m.HostPort <= 0 || m.HostPort > 65535):
		return fmt.Errorf("host port %d is out of range", m.HostPort)
	case len(m.QMPSocket()) >= unixPathMax || len(m.AgentSocket()) >= unixPathMax:
		return fmt.Errorf("vm directory %s is too long for unix sockets (max %d bytes): use a shorter --data-dir", m.Dir, unixPathMax-12)
	}
	return nil
}

// Args is the QEMU command line (without the binary). Disks are given with
// -blockdev and node names so later work can add overlays and mirror by name.
func (m Machine) Args() []string {
	mem := strconv.FormatInt(m.MemoryBytes>>20, 10) + "M"
	if m.RAMPad {
		mem = strconv.FormatInt(m.MemoryBytes>>10+RAMPadKiB, 10) + "K"
	}
	args := []string{
		"-name", "guest=" + m.Name + ",debug-threads=on",
		"-uuid", m.UUID,
		"-machine", machineType + ",accel=" + m.Accel,
		"-cpu", cpuModel(m.Accel),
		"-m", mem,
		"-smp", strconv.Itoa(m.CPUs),
		"-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
	}
	if m.Kernel != "" {
		args = append(args, "-kernel", m.Kernel, "-initrd", m.Initrd, "-append", m.Cmdline)
	}
	if m.Firmware == FirmwareUEFI {
		args = append(args,
			"-blockdev", "driver=file,filename="+m.FirmwareCode+",node-name=fw-code,read-only=on",
			"-blockdev", "driver=file,filename="+m.FirmwareVars+",node-name=fw-vars",
			"-machine", "pflash0=fw-code,pflash1=fw-vars")
	}
	args = append(args,
		"-chardev", "file,id=serial0,path="+m.SerialLog(),
		"-serial", "chardev:serial0",
		"-qmp", "unix:"+m.QMPSocket()+",server=on,wait=off",
		"-blockdev", "driver=file,filename="+m.Disk+",node-name=disk0-file",
		"-blockdev", "driver=qcow2,file=disk0-file,node-name=disk0",
		"-device", "virtio-blk-pci,drive=disk0,id=vda,bootindex=1",
	)
	args = append(args, m.netArgs()...)
	args = append(args,
		"-device", "virtio-serial-pci,id=vser0",
		"-chardev", "socket,id=agent0,path="+m.AgentSocket()+",server=on,wait=off",
		"-device", "virtserialport,chardev=agent0,name=org.vigil.agent.0",
		"-device", "pvpanic-pci",
		// A panicked guest is kept (paused) for its evidence; the host
		// agent sees GUEST_PANICKED and recovers it.
		"-action", "panic=pause",
		"-pidfile", m.PIDFile(),
		"-D", m.LogFile(),
	)
	if m.GuestAgent {
		args = append(args,
			"-chardev", "socket,id=qga0,path="+m.QGASocket()+",server=on,wait=off",
			"-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0")
	}
	if m.Seed != "" {
		args = append(args,
			"-blockdev", "driver=file,filename="+m.Seed+",node-name=seed0-file,read-only=on",
			"-blockdev", "driver=raw,file=seed0-file,node-name=seed0,read-only=on",
			"-device", "virtio-blk-pci,drive=seed0,id=vdb")
	}
	switch {
	case m.CDROMDrive && m.CDROM != "":
		args = append(args,
			"-blockdev", "driver=file,filename="+m.CDROM+",node-name=cd0-file,read-only=on",
			"-blockdev", "driver=raw,file=cd0-file,node-name=cd0,read-only=on",
			"-device", "ide-cd,drive=cd0,id=cd0,bus=ide.0,bootindex=2")
	case m.CDROMDrive:
		args = append(args, "-device", "ide-cd,id=cd0,bus=ide.0,bootindex=2")
	}
	if m.Display {
		args = append(args, "-device", "VGA,id=vga0", "-vnc", "unix:"+m.VNCSocket())
	}
	if m.Incoming {
		args = append(args, "-incoming", "defer")
	}
	return append(args, "-daemonize")
}

// netArgs are the VM's network cards: on taps, or one on user-mode
// networking with the guest's port 80 forwarded to 127.0.0.1:HostPort (the
// rule AddHostFwd adds). nic0 keeps its PCI place either way, so the
// devices a saved state depends on do not change with the backend.
func (m Machine) netArgs() []string {
	if len(m.NICs) == 0 {
		netdev := "user,id=net0,hostfwd=" + hostFwdRule(m.HostPort) + "-:80"
		if m.NoHostFwd {
			netdev = "user,id=net0"
		}
		return []string{"-netdev", netdev, "-device", "virtio-net-pci,netdev=net0,id=nic0"}
	}
	var args []string
	for i, n := range m.NICs {
		id := strconv.Itoa(i)
		vhost := "off"
		if n.Vhost {
			vhost = "on"
		}
		args = append(args,
			"-netdev", "tap,id=net"+id+",ifname="+n.Tap+",script=no,downscript=no,vhost="+vhost,
			"-device", "virtio-net-pci,netdev=net"+id+",id=nic"+id+",mac="+n.MAC)
	}
	return args
}

// hostFwdRule is the host side of the forward, in hostfwd_add's syntax.
func hostFwdRule(port int) string { return "tcp:127.0.0.1:" + strconv.Itoa(port) }

func cpuModel(accel string) string {
	if accel == AccelKVM {
		return "host"
	}
	return "max"
}
