package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/client"
)

// cluster is one manager and several host agents, each its own `vigil`
// process as in production, with the hosts sharing one storage pool so VMs
// can move between them.
type cluster struct {
	c        *client.Client
	dir      string
	procs    map[string]*exec.Cmd // "manager" and the host names
	hostDirs map[string]string    // host name → its --data-dir
	hostArgs map[string][]string  // host name → its command line, to restart it
}

// timing sets the failure detection of a cluster; zero values keep
// Vigil's defaults.
type timing struct {
	fenceAfter, deadAfter time.Duration
}

// startCluster starts a manager and the named hosts under dir (kept short:
// VM sockets live below it) and waits until every host is up. On error
// what was started is stopped again.
func startCluster(ctx context.Context, dir string, tm timing, hosts ...string) (cl *cluster, err error) {
	bin := filepath.Join(os.Getenv("VIGIL_BIN"), "vigil")
	imageDir := os.Getenv("VIGIL_TEST_IMAGE")
	cl = &cluster{dir: dir, procs: map[string]*exec.Cmd{}, hostDirs: map[string]string{}, hostArgs: map[string][]string{}}
	defer func() {
		if err != nil {
			err = fmt.Errorf("%w%s", err, cl.logTails(20))
			cl.stop()
			cl = nil
		}
	}()
	pool := filepath.Join(dir, "pool")
	if err := os.MkdirAll(pool, 0o755); err != nil {
		return nil, err
	}
	addr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	margs := []string{"agent", "--manager", "--listen", addr, "--data-dir", filepath.Join(dir, "m")}
	if tm.deadAfter > 0 {
		margs = append(margs, "--host-dead-after", tm.deadAfter.String())
	}
	if err := cl.start(ctx, "manager", bin, margs...); err != nil {
		return nil, err
	}
	var token string
	for t0 := time.Now(); ; time.Sleep(100 * time.Millisecond) {
		cl.c = clientFor(filepath.Join(dir, "m"))
		tctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		var jt api.JoinToken
		jt, err = cl.c.JoinToken(tctx, "")
		token = jt.Token
		cancel()
		if err == nil {
			break
		}
		if time.Since(t0) > time.Minute {
			return nil, fmt.Errorf("manager not answering after a minute: %w", err)
		}
	}
	for i, h := range hosts {
		if i > 0 {
			// A token admits one host.
			jt, err := cl.c.JoinToken(ctx, "")
			if err != nil {
				return nil, err
			}
			token = jt.Token
		}
		hd := filepath.Join(dir, h)
		cl.hostDirs[h] = hd
		hargs := []string{"agent", "--host", "--name", h, "--manager", "https://" + addr, "--join-token", token,
			"--data-dir", hd, "--image-dir", imageDir, "--storage-pool", pool}
		if tm.fenceAfter > 0 {
			hargs = append(hargs, "--fence-after", tm.fenceAfter.String())
		}
		if err := cl.start(ctx, h, bin, hargs...); err != nil {
			return nil, err
		}
		// A host that joined comes back with its own credentials.
		again := slices.Clone(hargs)
		again[slices.Index(again, "--join-token")+1] = ""
		cl.hostArgs[h] = again
	}
	for t0 := time.Now(); ; time.Sleep(100 * time.Millisecond) {
		hs, err := cl.c.Hosts(ctx)
		if err != nil {
			return nil, err
		}
		up := 0
		for _, h := range hs {
			if _, ok := cl.hostDirs[h.Name]; ok && h.State == "up" {
				up++
			}
		}
		if up == len(hosts) {
			return cl, nil
		}
		if time.Since(t0) > time.Minute {
			return nil, fmt.Errorf("only %d of %d hosts up after a minute: %+v", up, len(hosts), hs)
		}
	}
}

// start runs one agent with its output in dir/NAME.log.
func (cl *cluster) start(ctx context.Context, name, bin string, args ...string) error {
	log, err := os.Create(filepath.Join(cl.dir, name+".log"))
	if err != nil {
		return err
	}
	defer log.Close() // the child has its own copy
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", name, err)
	}
	cl.procs[name] = cmd
	return nil
}

// killHost is a host's death: SIGKILL of its agent and of every QEMU it
// started (QEMU daemonizes, so it outlives the agent otherwise).
func (cl *cluster) killHost(name string) error {
	cmd, ok := cl.procs[name]
	if !ok {
		return fmt.Errorf("no running host %s", name)
	}
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	delete(cl.procs, name)
	if n := killQEMUs(cl.hostDirs[name]); n == 0 {
		return fmt.Errorf("host %s had no qemu to kill", name)
	}
	return nil
}

// restartHost starts a host agent that was killed again.
func (cl *cluster) restartHost(ctx context.Context, name string) error {
	args, ok := cl.hostArgs[name]
	if !ok {
		return fmt.Errorf("no host %s to restart", name)
	}
	if _, running := cl.procs[name]; running {
		return fmt.Errorf("host %s runs", name)
	}
	return cl.start(ctx, name, filepath.Join(os.Getenv("VIGIL_BIN"), "vigil"), args...)
}

// stop kills every agent and every QEMU of the cluster's hosts.
func (cl *cluster) stop() {
	for name, cmd := range cl.procs {
		cmd.Process.Signal(syscall.SIGKILL)
		cmd.Wait()
		delete(cl.procs, name)
	}
	for _, d := range cl.hostDirs {
		killQEMUs(d)
	}
}

// logTails returns the last n lines of every agent's log, to explain an error.
func (cl *cluster) logTails(n int) string {
	var b strings.Builder
	logs, _ := filepath.Glob(filepath.Join(cl.dir, "*.log"))
	for _, p := range logs {
		data, err := os.ReadFile(p)
		if err != nil || len(data) == 0 {
			continue
		}
		lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
		if len(lines) > n {
			lines = lines[len(lines)-n:]
		}
		fmt.Fprintf(&b, "\n--- %s (last %d lines)\n%s", filepath.Base(p), len(lines), strings.Join(lines, "\n"))
	}
	return b.String()
}

// killQEMUs SIGKILLs the QEMUs a host agent with this data dir started,
// found by their pid files; a pid counts only if its command line names the
// data dir, so a recycled pid is never hit. It returns how many it killed,
// once they are gone (they are not our children: QEMU daemonizes), so the
// next measurement does not share the machine with them.
func killQEMUs(dataDir string) int {
	paths, _ := filepath.Glob(filepath.Join(dataDir, "host", "vms", "*", "qemu.pid"))
	var killed []int
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		var pid int
		if _, err := fmt.Sscan(string(b), &pid); err != nil || pid <= 0 {
			continue
		}
		cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil || !bytes.Contains(cmdline, []byte(dataDir+"/")) {
			continue
		}
		if syscall.Kill(pid, syscall.SIGKILL) == nil {
			killed = append(killed, pid)
		}
	}
	for _, pid := range killed {
		for t := time.Now(); alive(pid) && time.Since(t) < 5*time.Second; {
			time.Sleep(10 * time.Millisecond)
		}
	}
	return len(killed)
}

// alive is false once pid has exited, even if nobody has reaped it yet.
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(b, ')')
	return i > 0 && i+2 < len(b) && b[i+2] != 'Z' && b[i+2] != 'X'
}
