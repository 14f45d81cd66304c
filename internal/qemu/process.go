package qemu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vigil-project/vigil/internal/qemu/qmp"
)

// ErrNotInstalled means no QEMU binary was found.
var ErrNotInstalled = errors.New("qemu-system-x86_64 is not installed: install it with 'apt-get install qemu-system-x86' (or run 'make run')")

// ErrNotRunning means a VM directory has no live QEMU process to adopt.
var ErrNotRunning = errors.New("no qemu process is running")

// FindBinary locates qemu-system-x86_64 on PATH.
func FindBinary() (string, error) {
	p, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		return "", ErrNotInstalled
	}
	return p, nil
}

// Process is a running QEMU, whether this agent started it or adopted it.
type Process struct {
	PID     int
	Monitor *qmp.Monitor
	m       Machine
}

// Start launches QEMU daemonized, so that it is not a child that dies with
// the agent, and connects to its QMP socket.
func Start(ctx context.Context, bin string, m Machine) (*Process, error) {
	if err := m.Validate(); err != nil {
		return nil, fmt.Errorf("start %s: %w", m.Name, err)
	}
	for _, p := range []string{m.QMPSocket(), m.AgentSocket(), m.PIDFile()} {
		if err := os.Remove(p); err != nil && !os.IsNotExist(err) {
			return nil, fmt.Errorf("start %s: remove stale %s: %w", m.Name, p, err)
		}
	}
	// Keep the previous boot's console for post-mortems.
	if _, err := os.Stat(m.SerialLog()); err == nil {
		os.Rename(m.SerialLog(), m.SerialLog()+".1")
	}
	cmd := exec.CommandContext(ctx, bin, m.Args()...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	cmd.Stdout = &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	// With -daemonize the launcher exits once the VM is set up; its exit
	// status is QEMU's verdict on the command line.
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(stderr.String())
		if msg == "" {
			msg = err.Error()
		}
		return nil, fmt.Errorf("start %s: qemu: %s", m.Name, firstLine(msg))
	}
	pid, err := readPID(m.PIDFile())
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", m.Name, err)
	}
	mon, err := dialRetry(ctx, m.QMPSocket())
	if err != nil {
		killPID(pid)
		return nil, fmt.Errorf("start %s: connect to qmp: %w", m.Name, err)
	}
	return &Process{PID: pid, Monitor: mon, m: m}, nil
}

// Adopt reconnects to a QEMU that an earlier agent started for m.
func Adopt(ctx context.Context, m Machine) (*Process, error) {
	pid, err := readPID(m.PIDFile())
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, ErrNotRunning
		}
		return nil, err
	}
	if !ownsSocket(pid, m.QMPSocket()) {
		return nil, ErrNotRunning
	}
	mon, err := dialRetry(ctx, m.QMPSocket())
	if err != nil {
		return nil, fmt.Errorf("adopt %s (pid %d): %w", m.Name, pid, err)
	}
	return &Process{PID: pid, Monitor: mon, m: m}, nil
}

// Exited is closed when QEMU's monitor connection ends, i.e. QEMU is gone
// (or the agent closed its side).
func (p *Process) Exited() <-chan struct{} { return p.Monitor.Done() }

// Kill sends SIGKILL and waits until the process is gone.
func (p *Process) Kill(ctx context.Context) error {
	if !ownsSocket(p.PID, p.m.QMPSocket()) {
		return nil // already gone (and the pid may belong to someone else now)
	}
	if err := syscall.Kill(p.PID, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("kill qemu of %s (pid %d): %w", p.m.Name, p.PID, err)
	}
	return WaitGone(ctx, p.PID)
}

// Detach closes the agent's connection and leaves QEMU running.
func (p *Process) Detach() { p.Monitor.Close() }

// Alive reports whether pid is a live (not zombie) process.
func Alive(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	// The state follows the parenthesised command name, which may contain spaces.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		return false
	}
	return b[i+2] != 'Z' && b[i+2] != 'X'
}

// WaitGone waits until pid is no longer alive.
func WaitGone(ctx context.Context, pid int) error {
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	for Alive(pid) {
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for pid %d to exit: %w", pid, ctx.Err())
		case <-t.C:
		}
	}
	return nil
}

// ownsSocket is true when pid is alive and its command line names sock, so a
// recycled pid is never mistaken for our QEMU.
func ownsSocket(pid int, sock string) bool {
	if !Alive(pid) {
		return false
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return false
	}
	return cmdlineNamesSocket(b, sock)
}

// cmdlineNamesSocket tells whether a NUL-separated command line names sock
// as a whole path: at the start of an argument or after ':' or '=' (as in
// "unix:SOCK,server=on" or "path=SOCK"), and followed by the end of the
// argument or ','. A plain substring test would take /srv/vigil/vms/a/qmp.sock
// for /vigil/vms/a/qmp.sock, or web1/qmp.sock2 for web1/qmp.sock.
func cmdlineNamesSocket(cmdline []byte, sock string) bool {
	for arg := range bytes.SplitSeq(cmdline, []byte{0}) {
		for i := 0; ; {
			j := bytes.Index(arg[i:], []byte(sock))
			if j < 0 {
				break
			}
			start, end := i+j, i+j+len(sock)
			before := start == 0 || arg[start-1] == ':' || arg[start-1] == '='
			after := end == len(arg) || arg[end] == ','
			if before && after {
				return true
			}
			i = start + 1
		}
	}
	return false
}

// qmpDirUnder returns the VM directory, directly under vmsDir, whose QMP
// socket a qemu-system-* command line names (as Machine.Args does), or ""
// when the command line is not such a QEMU's.
func qmpDirUnder(cmdline []byte, vmsDir string) string {
	args := strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00")
	if !strings.HasPrefix(filepath.Base(args[0]), "qemu-system-") {
		return ""
	}
	prefix := filepath.Clean(vmsDir) + "/"
	for i, arg := range args[1:] {
		if arg != "-qmp" && arg != "--qmp" || i+2 >= len(args) {
			continue
		}
		path, _, _ := strings.Cut(strings.TrimPrefix(args[i+2], "unix:"), ",")
		name, ok := strings.CutPrefix(path, prefix)
		if !ok {
			continue
		}
		name, ok = strings.CutSuffix(name, "/qmp.sock")
		if ok && name != "" && name != "." && name != ".." && !strings.Contains(name, "/") {
			return prefix + name
		}
	}
	return ""
}

// Found is a live QEMU process of a VM directory.
type Found struct {
	PID int
	Dir string // the VM directory whose QMP socket its command line names
}

// FindUnder lists the live QEMU processes of the VM directories directly
// under vmsDir, whether or not anyone manages them: the process each
// DIR/qemu.pid names, and every qemu-system-* process whose command line
// names a QMP socket DIR/qmp.sock (its pid file may be gone, or the whole
// directory). Either way the command line must name DIR/qmp.sock, so a
// recycled pid is never taken for a QEMU.
func FindUnder(vmsDir string) ([]Found, error) {
	vmsDir = filepath.Clean(vmsDir)
	seen := map[int]bool{}
	var found []Found
	ents, err := os.ReadDir(vmsDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("find qemu processes of %s: %w", vmsDir, err)
	}
	for _, e := range ents {
		if !e.IsDir() {
			continue
		}
		dir := filepath.Join(vmsDir, e.Name())
		m := Machine{Dir: dir}
		pid, err := readPID(m.PIDFile())
		if err != nil || !ownsSocket(pid, m.QMPSocket()) {
			continue
		}
		seen[pid] = true
		found = append(found, Found{PID: pid, Dir: dir})
	}
	procs, err := os.ReadDir("/proc")
	if err != nil {
		return found, fmt.Errorf("find qemu processes of %s: %w", vmsDir, err)
	}
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil || seen[pid] || !Alive(pid) {
			continue
		}
		b, err := os.ReadFile("/proc/" + p.Name() + "/cmdline")
		if err != nil {
			continue // gone meanwhile, or not ours to read
		}
		if dir := qmpDirUnder(b, vmsDir); dir != "" {
			found = append(found, Found{PID: pid, Dir: dir})
		}
	}
	return found, nil
}

// KillFound sends SIGKILL to f, if its command line still names its VM's
// QMP socket (the pid may have been recycled since FindUnder), and waits
// until it is gone.
func KillFound(ctx context.Context, f Found) error {
	sock := Machine{Dir: f.Dir}.QMPSocket()
	if !ownsSocket(f.PID, sock) {
		return nil
	}
	if err := syscall.Kill(f.PID, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("kill qemu of %s (pid %d): %w", f.Dir, f.PID, err)
	}
	return WaitGone(ctx, f.PID)
}

func killPID(pid int) {
	syscall.Kill(pid, syscall.SIGKILL)
}

func readPID(path string) (int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, fmt.Errorf("read pid file: %w", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0, fmt.Errorf("pid file %s holds %q, not a pid", path, b)
	}
	return pid, nil
}

func dialRetry(ctx context.Context, sock string) (*qmp.Monitor, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	for {
		mon, err := qmp.Dial(ctx, sock)
		if err == nil {
			return mon, nil
		}
		select {
		case <-ctx.Done():
			return nil, err
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}

// BinaryVersion is the first line of `qemu-system-x86_64 --version`, or "".
func BinaryVersion(bin string) string {
	out, err := exec.Command(bin, "--version").Output()
	if err != nil {
		return ""
	}
	return strings.TrimPrefix(firstLine(strings.TrimSpace(string(out))), "QEMU emulator version ")
}
