package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"text/template"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/socket/dialers"
)

// libvirtd is Debian's libvirt daemon (and its virtlogd) started for the
// bench as root, as a system instance, and stopped after. These machines have
// no systemd, so the bench starts both itself.
//
// libvirtd runs in a private mount namespace with two files bound over the
// machine's: /dev/kvm is hidden (here it exists but cannot run guests; libvirt
// 9.0 then finds its capability cache "outdated" at every start, probes QEMU
// again for ~80 s and still picks TCG), and qemu.conf says `namespaces = []`
// (libvirt's per-domain /dev would try to bring the hidden /dev/kvm along).
// Networks set to autostart are hidden too: the bench's domains use
// user-mode networking and the machine's network is not to be touched.
// Nothing else differs from Debian's defaults: QEMU runs as libvirt-qemu with
// its files relabelled, stdio goes through virtlogd.
type libvirtd struct {
	dir      string
	kvm      bool // its domains run on KVM (as Vigil's do when accel is kvm)
	daemon   *exec.Cmd
	virtlogd *exec.Cmd
	conn     *libvirt.Libvirt
	// chmodded are the directories opened to libvirt-qemu, with their
	// modes before, put back by stop.
	chmodded map[string]os.FileMode
}

const (
	libvirtSocket  = "/run/libvirt/libvirt-sock"
	virtlogdSocket = "/run/libvirt/virtlogd-sock"
)

// libvirtUsable says why the bench cannot start libvirt here, if it cannot.
func libvirtUsable() error {
	if os.Geteuid() != 0 {
		return errors.New("the libvirt baseline needs root (a system libvirtd): run make bench as root")
	}
	if _, err := exec.LookPath("libvirtd"); err != nil {
		return errors.New("libvirtd not found: install libvirt-daemon-system and libvirt-clients (make bench does)")
	}
	return nil
}

func startLibvirtd(ctx context.Context, dir, accel string) (*libvirtd, error) {
	if err := libvirtUsable(); err != nil {
		return nil, err
	}
	bin, _ := exec.LookPath("libvirtd")
	for _, sock := range []string{libvirtSocket, virtlogdSocket} {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return nil, fmt.Errorf("a libvirt daemon already answers on %s: stop it, the bench starts its own", sock)
		}
	}
	d := &libvirtd{dir: dir, kvm: accel == "kvm", chmodded: map[string]os.FileMode{}}
	// Its files must be reachable by libvirt-qemu.
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	for p := dir; p != "/" && p != "."; p = filepath.Dir(p) {
		if fi, err := os.Stat(p); err == nil && fi.Mode().Perm()&0o001 == 0 {
			if err := os.Chmod(p, fi.Mode().Perm()|0o011); err != nil {
				d.stop()
				return nil, err
			}
			d.chmodded[p] = fi.Mode().Perm()
		}
	}
	noKVM, conf, empty := filepath.Join(dir, "no-kvm"), filepath.Join(dir, "qemu.conf"), filepath.Join(dir, "empty")
	if err := os.WriteFile(noKVM, nil, 0o600); err != nil {
		d.stop()
		return nil, err
	}
	if err := os.MkdirAll(empty, 0o755); err != nil {
		d.stop()
		return nil, err
	}
	if err := os.WriteFile(conf, []byte("namespaces = [ ]\n"), 0o644); err != nil {
		d.stop()
		return nil, err
	}
	// Under TCG /dev/kvm is hidden (see above); with KVM both sides use it.
	hideKVM := "."
	if !d.kvm {
		hideKVM = "/dev/kvm"
	}
	d.virtlogd = exec.Command("virtlogd")
	if err := d.virtlogd.Start(); err != nil {
		d.stop()
		return nil, fmt.Errorf("virtlogd: %w", err)
	}
	// unshare execs the shell, which execs libvirtd: daemon's PID is libvirtd's.
	d.daemon = exec.Command("unshare", "-m", "--propagation", "private", "sh", "-c",
		`{ [ "$6" = . ] || [ ! -e "$6" ] || mount --bind "$1" "$6"; } && mount --bind "$2" /etc/libvirt/qemu.conf &&
		{ [ ! -d "$4" ] || mount --bind "$3" "$4"; } && exec "$5"`,
		"sh", noKVM, conf, empty, "/etc/libvirt/qemu/networks/autostart", bin, hideKVM)
	d.daemon.Stderr = os.Stderr
	if err := d.daemon.Start(); err != nil {
		d.stop()
		return nil, fmt.Errorf("libvirtd: %w", err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		l := libvirt.NewWithDialer(dialers.NewLocal(dialers.WithSocket(libvirtSocket)))
		err := l.ConnectToURI(libvirt.QEMUSystem)
		if err == nil {
			d.conn = l
			return d, nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			d.stop()
			return nil, fmt.Errorf("libvirtd did not answer: %w", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// stop destroys and undefines every domain the bench made, then ends both
// daemons.
func (d *libvirtd) stop() {
	if d.conn != nil {
		doms, _, _ := d.conn.ConnectListAllDomains(1, 0)
		for _, dom := range doms {
			if strings.HasPrefix(dom.Name, "lvbench") {
				d.conn.DomainDestroy(dom)
				d.conn.DomainUndefineFlags(dom, libvirt.DomainUndefineManagedSave|libvirt.DomainUndefineSnapshotsMetadata)
			}
		}
		d.conn.Disconnect()
	}
	for p, mode := range d.chmodded {
		os.Chmod(p, mode)
	}
	interrupt(d.daemon, 10*time.Second)
	interrupt(d.virtlogd, 10*time.Second)
}

// libvirtDomain is a guest as libvirt runs it, made as alike to Vigil's as
// libvirt allows: the same kernel, initramfs and command line, q35, a
// virtio-blk qcow2 disk, user-mode networking on virtio-net, the agent's
// virtio-serial port on a unix socket, ACPI and a panic device.
type libvirtDomain struct {
	Name, Dir, Kernel, Initrd, Cmdline string
	MemoryMiB                          int64
	Type                               string // qemu (TCG) or kvm: set by define
}

func (g libvirtDomain) disk() string        { return filepath.Join(g.Dir, "disk.qcow2") }
func (g libvirtDomain) agentSocket() string { return filepath.Join(g.Dir, "agent.sock") }

// The panic device is ISA: libvirt 9.0 refuses pvpanic-pci on q35. It makes
// no memballoon and no USB controller, as Vigil does not.
var domainXML = template.Must(template.New("domain").Parse(`<domain type='{{.Type}}'>
  <name>{{.Name}}</name>
  <memory unit='MiB'>{{.MemoryMiB}}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{{.Kernel}}</kernel>
    <initrd>{{.Initrd}}</initrd>
    <cmdline>{{.Cmdline}}</cmdline>
  </os>
  <features><acpi/></features>
  {{if eq .Type "kvm"}}<cpu mode='host-passthrough' check='none'/>{{else}}<cpu mode='maximum' check='none'/>{{end}}
  <on_crash>preserve</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{{.Dir}}/disk.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='user'><model type='virtio'/></interface>
    <serial type='file'><source path='{{.Dir}}/serial.log'/><target port='0'/></serial>
    <channel type='unix'>
      <source mode='bind' path='{{.Dir}}/agent.sock'/>
      <target type='virtio' name='org.vigil.agent.0'/>
    </channel>
    <panic model='isa'/>
    <memballoon model='none'/>
    <controller type='usb' model='none'/>
  </devices>
</domain>
`))

// define makes g's directory (the image's kernel and initramfs copied in, a
// blank 256 MiB disk) and defines it, persistent as a managed save needs.
func (d *libvirtd) define(ctx context.Context, g libvirtDomain) (libvirt.Domain, error) {
	if err := os.MkdirAll(g.Dir, 0o755); err != nil {
		return libvirt.Domain{}, err
	}
	// Copies: libvirt relabels the files it gives QEMU.
	for _, f := range []struct{ from, to string }{{g.Kernel, "vmlinuz"}, {g.Initrd, "initrd.img"}} {
		if out, err := exec.CommandContext(ctx, "cp", f.from, filepath.Join(g.Dir, f.to)).CombinedOutput(); err != nil {
			return libvirt.Domain{}, fmt.Errorf("copy %s: %v: %s", f.from, err, out)
		}
	}
	g.Kernel, g.Initrd = filepath.Join(g.Dir, "vmlinuz"), filepath.Join(g.Dir, "initrd.img")
	g.Type = "qemu"
	if d.kvm {
		g.Type = "kvm"
	}
	if out, err := exec.CommandContext(ctx, "qemu-img", "create", "-q", "-f", "qcow2", g.disk(), "256M").CombinedOutput(); err != nil {
		return libvirt.Domain{}, fmt.Errorf("qemu-img: %v: %s", err, out)
	}
	var xml bytes.Buffer
	if err := domainXML.Execute(&xml, g); err != nil {
		return libvirt.Domain{}, err
	}
	return d.conn.DomainDefineXML(xml.String())
}
