package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/client"
)

// idleWindow is how long each idle measurement lasts.
const idleWindow = 60 * time.Second

// idle measures what each management daemon costs while nothing happens:
// CPU time over a minute and resident memory, with 0, 1, 10 and 50 idle VMs
// for Vigil (its dev agent in its own process: API, controllers, embedded
// etcd and the host agent) and 0, 1 and 10 for libvirt (libvirtd and
// virtlogd). QEMU's own cost is counted on neither side.
func (b *bench) idle(ctx context.Context) ([]row, error) {
	counts := []int{0, 1, 10, 50}
	if err := libvirtUsable(); err != nil { // before minutes of Vigil's side
		return nil, err
	}
	vigil, err := b.idleVigil(ctx, counts)
	if err != nil {
		return nil, err
	}
	lv, err := b.idleLibvirt(ctx, counts[:3])
	if err != nil {
		return nil, err
	}
	var rows []row
	for i, n := range counts {
		v := vigil[i]
		what := fmt.Sprintf("Daemon idle, %d VM(s): CPU seconds per minute, resident memory", n)
		note := "CPU of the daemon's own process(es) over " + idleWindow.String() + ", QEMU not counted"
		if n > 0 {
			note += fmt.Sprintf("; Vigil per VM above none: %.3f CPU-s/min, %.1f MB",
				(v.cpu-vigil[0].cpu)/float64(n), (v.rssMB-vigil[0].rssMB)/float64(n))
		}
		r := row{what: what, vigil: v.String(), baseline: "not measured", ratio: "-", note: note}
		if i < len(lv) {
			l := lv[i]
			r.baseline = l.String() + " (libvirtd + virtlogd)"
			cpu := ratio(v.cpu, l.cpu) + " CPU"
			if l.cpu == 0 {
				// Under one clock tick (10 ms) in the whole window.
				cpu = "∞ CPU (libvirt's below 0.01 CPU-s/min)"
			}
			r.ratio = cpu + ", " + ratio(v.rssMB, l.rssMB) + " memory"
		}
		rows = append(rows, r)
	}
	return rows, nil
}

type idleCost struct {
	cpu   float64 // CPU seconds per minute
	rssMB float64
}

func (c idleCost) String() string { return fmt.Sprintf("%.2f CPU-s/min, %.1f MB", c.cpu, c.rssMB) }

// measureIdle waits for things to settle, then reads the processes' CPU
// time across idleWindow and their resident memory at its end.
func measureIdle(ctx context.Context, pids ...int) (idleCost, error) {
	select {
	case <-time.After(10 * time.Second):
	case <-ctx.Done():
		return idleCost{}, ctx.Err()
	}
	cpu := func() (float64, error) {
		var sum float64
		for _, pid := range pids {
			s, err := procCPU(pid)
			if err != nil {
				return 0, err
			}
			sum += s
		}
		return sum, nil
	}
	c0, err := cpu()
	if err != nil {
		return idleCost{}, err
	}
	t0 := time.Now()
	select {
	case <-time.After(idleWindow):
	case <-ctx.Done():
		return idleCost{}, ctx.Err()
	}
	c1, err := cpu()
	if err != nil {
		return idleCost{}, err
	}
	var rss float64
	for _, pid := range pids {
		kb, err := procRSSKiB(pid)
		if err != nil {
			return idleCost{}, err
		}
		rss += float64(kb) / 1000
	}
	return idleCost{cpu: (c1 - c0) / time.Since(t0).Minutes(), rssMB: rss}, nil
}

// interrupt asks a child to end (SIGINT) and kills it if it has not
// within grace.
func interrupt(cmd *exec.Cmd, grace time.Duration) {
	if cmd == nil || cmd.Process == nil {
		return
	}
	cmd.Process.Signal(os.Interrupt)
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(grace):
		cmd.Process.Kill()
		<-done
	}
}

// procCPU is a process's user and system CPU time in seconds (its own,
// not its children's), from /proc/PID/stat (clock ticks of 1/100 s).
func procCPU(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name, in parentheses, may hold spaces: count after it.
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(f) < 13 {
		return 0, fmt.Errorf("short /proc/%d/stat", pid)
	}
	utime, err1 := strconv.ParseFloat(f[11], 64)
	stime, err2 := strconv.ParseFloat(f[12], 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, err
	}
	return (utime + stime) / 100, nil
}

func procRSSKiB(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			return strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
		}
	}
	return 0, fmt.Errorf("no VmRSS for process %d", pid)
}

// idleVigil runs `vigil agent --dev` as its own process and measures it
// with each count of idle VMs (128 MiB, built-in guest), adding VMs between
// measurements; it deletes them all before it stops the agent.
func (b *bench) idleVigil(ctx context.Context, counts []int) ([]idleCost, error) {
	dir := filepath.Join(b.tmp, "idle-vigil")
	addr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	logf, err := os.Create(filepath.Join(b.tmp, "idle-vigil.log"))
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := exec.Command(filepath.Join(os.Getenv("VIGIL_BIN"), "vigil"), "agent", "--dev", "--data-dir", dir,
		"--listen", addr, "--image-dir", os.Getenv("VIGIL_TEST_IMAGE"), "--accel", b.accel,
		// 50 idle 1-vCPU guests on 2 CPUs: more than the default promises.
		"--cpu-overcommit", "32")
	// Its own default CLI configuration, not the user's.
	cmd.Env = append(os.Environ(), "XDG_CONFIG_HOME="+filepath.Join(dir, "config"))
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	defer interrupt(cmd, 30*time.Second)
	var c *client.Client
	for deadline := time.Now().Add(60 * time.Second); ; {
		c = clientFor(dir)
		if _, err = c.Hosts(ctx); err == nil {
			break
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("idle: the dev agent did not answer (log in %s): %w", logf.Name(), err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	made := 0 // VMs asked for, the last perhaps not made
	defer func() {
		// The dev agent leaves VMs running when it stops: delete them first.
		for i := 0; i < made; i++ {
			if err := c.DeleteVM(context.WithoutCancel(ctx), fmt.Sprintf("idle%02d", i), true); err != nil && i < made-1 {
				fmt.Fprintf(os.Stderr, "vigil-bench: idle: delete idle%02d: %v\n", i, err)
			}
		}
	}()
	var out []idleCost
	for _, n := range counts {
		for made < n {
			made++
			if _, err := c.CreateVM(ctx, api.VMCreateRequest{Name: fmt.Sprintf("idle%02d", made-1), MemoryBytes: 128 << 20, CPUs: 1, DiskBytes: 64 << 20, Start: true}); err != nil {
				return nil, err
			}
		}
		for i := 0; i < n; i++ {
			if _, err := c.WaitGuest(ctx, fmt.Sprintf("idle%02d", i)); err != nil {
				return nil, err
			}
		}
		cost, err := measureIdle(ctx, cmd.Process.Pid)
		if err != nil {
			return nil, err
		}
		out = append(out, cost)
	}
	return out, nil
}

// idleLibvirt starts libvirt for the bench and measures libvirtd and
// virtlogd with each count of idle domains, as alike to Vigil's as it can.
func (b *bench) idleLibvirt(ctx context.Context, counts []int) ([]idleCost, error) {
	d, err := startLibvirtd(ctx, filepath.Join(b.tmp, "libvirt-idle"), b.accel)
	if err != nil {
		return nil, err
	}
	defer d.stop()
	made := 0
	var out []idleCost
	for _, n := range counts {
		for ; made < n; made++ {
			name := fmt.Sprintf("lvbenchidle%02d", made)
			g := libvirtDomain{Name: name, Dir: filepath.Join(d.dir, name), Kernel: b.img.Kernel, Initrd: b.img.Initrd,
				Cmdline: b.img.Cmdline + " vigil.name=" + name, MemoryMiB: 128}
			dom, err := d.define(ctx, g)
			if err != nil {
				return nil, err
			}
			if err := d.conn.DomainCreate(dom); err != nil {
				return nil, fmt.Errorf("libvirt: start %s: %w", name, err)
			}
			if err := nextHeartbeat(g.agentSocket(), 120*time.Second); err != nil {
				return nil, fmt.Errorf("libvirt: %s: %w", name, err)
			}
		}
		cost, err := measureIdle(ctx, d.daemon.Process.Pid, d.virtlogd.Process.Pid)
		if err != nil {
			return nil, err
		}
		out = append(out, cost)
	}
	return out, nil
}
