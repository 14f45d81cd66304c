package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/vigil-project/vigil/client"
	"github.com/vigil-project/vigil/internal/guestimage"
	"github.com/vigil-project/vigil/internal/qemu"
	"github.com/vigil-project/vigil/internal/qemu/qmp"
)

type bench struct {
	c       *client.Client
	img     *guestimage.Image
	tmp     string
	dataDir string
	runs    int    // runs per series, each side (-runs)
	accel   string // the accelerator every QEMU here uses
}

// livePrecopy reports whether the VMs measured here (all made with RAMPad,
// as Vigil makes them) are copied while they run.
func (b *bench) livePrecopy() bool {
	return qemu.LivePrecopySafe(qemu.Machine{Accel: b.accel, RAMPad: true})
}

// bareVM is QEMU started by hand with the same command line Vigil uses, as
// the baseline an operator would have without Vigil.
type bareVM struct {
	m   qemu.Machine
	cmd *exec.Cmd
	mon *qmp.Monitor
}

func (b *bench) bareMachine(name string, mem int64, disk string) (qemu.Machine, error) {
	dir := filepath.Join(b.tmp, name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return qemu.Machine{}, err
	}
	port, err := freePort()
	if err != nil {
		return qemu.Machine{}, err
	}
	if disk == "" {
		disk = filepath.Join(dir, "disk.qcow2")
		if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", disk, "256M").CombinedOutput(); err != nil {
			return qemu.Machine{}, fmt.Errorf("qemu-img: %v: %s", err, out)
		}
	}
	return qemu.Machine{Name: name, UUID: "00000000-0000-4000-8000-000000000002", MemoryBytes: mem, RAMPad: true, CPUs: 1, Accel: b.accel,
		Kernel: b.img.Kernel, Initrd: b.img.Initrd, Cmdline: b.img.Cmdline + " vigil.name=" + name,
		Disk: disk, HostPort: port, Dir: dir,
		// Every VM Vigil makes has qemu-guest-agent's port: the same devices
		// (a saved state loads only into the same hardware).
		GuestAgent: true}, nil
}

// startBare runs m in the foreground (no -daemonize) and connects QMP.
func startBare(ctx context.Context, m qemu.Machine, extra ...string) (*bareVM, error) {
	bin, err := qemu.FindBinary()
	if err != nil {
		return nil, err
	}
	args := m.Args()
	args = append(args[:len(args)-1], extra...) // drop -daemonize
	cmd := exec.CommandContext(ctx, bin, args...)
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	var mon *qmp.Monitor
	for i := 0; i < 500; i++ {
		if mon, err = qmp.Dial(ctx, m.QMPSocket()); err == nil {
			return &bareVM{m: m, cmd: cmd, mon: mon}, nil
		}
		time.Sleep(10 * time.Millisecond)
	}
	cmd.Process.Kill()
	cmd.Wait()
	return nil, fmt.Errorf("bare qemu: qmp: %w", err)
}

func (v *bareVM) stop() {
	v.mon.Close()
	v.cmd.Process.Kill()
	v.cmd.Wait()
}

// nextHeartbeat connects to the guest agent socket and returns when a
// heartbeat line arrives.
func nextHeartbeat(sock string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		conn, err := net.Dial("unix", sock)
		if err != nil {
			time.Sleep(5 * time.Millisecond)
			continue
		}
		conn.SetReadDeadline(deadline)
		line, err := bufio.NewReader(conn).ReadString('\n')
		conn.Close()
		if err == nil && strings.Contains(line, `"heartbeat"`) {
			return nil
		}
	}
	return errors.New("no heartbeat from the bare guest")
}
