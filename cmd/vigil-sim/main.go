// vigil-sim drives a real Vigil manager (its own process, embedded etcd)
// with many simulated hosts (internal/simhost) that join it for real and
// speak the real host protocol over mutual TLS, each with simulated VMs,
// and measures what the control plane does with them: heartbeat latency
// and whether heartbeats keep up, the manager's CPU and memory, API
// latency, etcd's size, and how long a host death takes to act on.
//
//	vigil-sim -hosts 300 -vms 20 -steady 60s -out docs/scale-300.md
//
// VIGIL_BIN names the directory holding the vigil binary.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/client"
	"github.com/vigil-project/vigil/internal/agent"
	"github.com/vigil-project/vigil/internal/hostproto"
	"github.com/vigil-project/vigil/internal/simhost"
)

func main() {
	hosts := flag.Int("hosts", 100, "simulated hosts")
	vms := flag.Int("vms", 20, "VMs per host")
	steady := flag.Duration("steady", time.Minute, "how long to measure the steady state")
	deadAfter := flag.Duration("host-dead-after", 8*time.Second, "the manager's --host-dead-after")
	out := flag.String("out", "", "also write the report (markdown) here")
	workers := flag.Int("workers", 8, "concurrent API calls while creating VMs")
	flag.Parse()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	report, err := run(ctx, *hosts, *vms, *workers, *steady, *deadAfter)
	fmt.Print(report)
	if *out != "" && report != "" {
		os.WriteFile(*out, []byte(report), 0o644)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "vigil-sim:", err)
		os.Exit(1)
	}
}

type sim struct {
	c      *client.Client
	url    string
	pid    int
	tmp    string
	hosts  []*simulated
	report strings.Builder
}

type simulated struct {
	name   string
	host   *simhost.Host
	cancel context.CancelFunc
	done   chan error
}

func (s *sim) line(format string, args ...any) {
	fmt.Fprintf(&s.report, format+"\n", args...)
	fmt.Fprintf(os.Stderr, "vigil-sim: "+format+"\n", args...)
}

func run(ctx context.Context, nHosts, nVMs, workers int, steady, deadAfter time.Duration) (string, error) {
	bin := filepath.Join(os.Getenv("VIGIL_BIN"), "vigil")
	if _, err := os.Stat(bin); err != nil {
		return "", fmt.Errorf("set VIGIL_BIN to the directory holding the vigil binary: %w", err)
	}
	tmp, err := os.MkdirTemp("", "vigil-sim-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tmp)
	s := &sim{tmp: tmp}
	addr, err := freeAddr()
	if err != nil {
		return "", err
	}
	mdir := filepath.Join(tmp, "manager")
	cmd := exec.CommandContext(ctx, bin, "agent", "--manager", "--listen", addr, "--data-dir", mdir,
		"--host-dead-after", deadAfter.String(), "--log-level", "warn")
	logf, _ := os.Create(filepath.Join(tmp, "manager.log"))
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		return "", err
	}
	defer func() { cmd.Process.Signal(syscall.SIGKILL); cmd.Wait() }()
	s.pid, s.url = cmd.Process.Pid, "https://"+addr
	for t0 := time.Now(); ; time.Sleep(100 * time.Millisecond) {
		s.c = clientFor(mdir)
		if _, err := s.c.Hosts(ctx); err == nil {
			break
		}
		if time.Since(t0) > time.Minute {
			b, _ := os.ReadFile(filepath.Join(tmp, "manager.log"))
			return "", fmt.Errorf("manager not up:\n%s", b)
		}
	}
	s.line("# vigil-sim: %d hosts × %d VMs, one manager (embedded etcd), host-dead-after %s", nHosts, nVMs, deadAfter)
	s.line("")
	s.line("Started %s on this machine (%d CPUs); the simulator and the manager share it.", time.Now().UTC().Format(time.RFC3339), numCPU())
	s.line("")

	t0 := time.Now()
	if err := s.startHosts(ctx, nHosts, deadAfter); err != nil {
		return s.report.String(), err
	}
	s.line("- %d hosts joined (join token, certificate, registration) in %s", nHosts, time.Since(t0).Round(time.Millisecond))
	t0 = time.Now()
	createLat, err := s.createVMs(ctx, nHosts*nVMs, workers)
	if err != nil {
		return s.report.String(), err
	}
	s.line("- %d VMs created and started through the API in %s (%d at a time): create p50 %s, p99 %s",
		nHosts*nVMs, time.Since(t0).Round(time.Millisecond), workers, pct(createLat, 50), pct(createLat, 99))
	s.line("")
	if err := s.steadyState(ctx, steady, nHosts); err != nil {
		return s.report.String(), err
	}
	if err := s.hostDeath(ctx, deadAfter); err != nil {
		return s.report.String(), err
	}
	return s.report.String(), nil
}

// startHosts joins n simulated hosts, a few at a time.
func (s *sim) startHosts(ctx context.Context, n int, deadAfter time.Duration) error {
	fence := deadAfter - 3*time.Second
	if fence < 2*time.Second {
		fence = 2 * time.Second
	}
	var mu sync.Mutex
	errc := make(chan error, n)
	sem := make(chan struct{}, 16)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		tok, err := s.c.JoinToken(ctx, "")
		if err != nil {
			return err
		}
		name := fmt.Sprintf("sim%04d", i)
		hctx, cancel := context.WithCancel(ctx)
		sh := &simulated{name: name, cancel: cancel, done: make(chan error, 1)}
		ready := make(chan struct{})
		cfg := agent.HostConfig{Name: name, DataDir: filepath.Join(s.tmp, "hosts", name), Listen: "127.0.0.1:0",
			Managers: []string{s.url}, JoinToken: tok.Token, FenceAfter: fence,
			Logger: slog.New(slog.DiscardHandler), Ready: func(string) { close(ready) }}
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			go func() {
				sh.done <- agent.RunSimulatedHost(hctx, cfg, func(notify func(hostproto.Event)) agent.SimulatedHost {
					h := simhost.New(name, "sim-pool", notify)
					mu.Lock()
					sh.host = h
					mu.Unlock()
					return h
				})
			}()
			select {
			case <-ready:
			case err := <-sh.done:
				errc <- fmt.Errorf("host %s: %w", name, err)
			case <-time.After(time.Minute):
				errc <- fmt.Errorf("host %s did not join within a minute", name)
			}
			<-sem
		}()
		s.hosts = append(s.hosts, sh)
	}
	wg.Wait()
	close(errc)
	if err := <-errc; err != nil {
		return err
	}
	// Every host up in the manager's eyes.
	for t0 := time.Now(); ; time.Sleep(200 * time.Millisecond) {
		hs, err := s.c.Hosts(ctx)
		up := 0
		for _, h := range hs {
			if h.State == "up" {
				up++
			}
		}
		if err == nil && up == n {
			return nil
		}
		if time.Since(t0) > 2*time.Minute {
			return fmt.Errorf("%d of %d hosts up after 2 minutes (%v)", up, n, err)
		}
	}
}

// createVMs creates and starts n VMs through the API, workers at a time,
// and returns each create's latency.
func (s *sim) createVMs(ctx context.Context, n, workers int) ([]time.Duration, error) {
	var mu sync.Mutex
	var lat []time.Duration
	var next atomic.Int64
	var firstErr error
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				t0 := time.Now()
				_, err := s.c.CreateVM(ctx, api.VMCreateRequest{Name: fmt.Sprintf("vm%05d", i), MemoryBytes: 1 << 30, CPUs: 1, DiskBytes: 10 << 30, Start: true})
				d := time.Since(t0)
				mu.Lock()
				if err != nil && firstErr == nil {
					firstErr = fmt.Errorf("create vm%05d: %w", i, err)
				}
				lat = append(lat, d)
				mu.Unlock()
				if err != nil {
					return
				}
			}
		})
	}
	wg.Wait()
	return lat, firstErr
}

func freeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

func clientFor(dataDir string) *client.Client {
	return client.ForConfigFile(filepath.Join(dataDir, "client.yaml"))
}

func numCPU() int {
	b, _ := os.ReadFile("/proc/cpuinfo")
	return strings.Count(string(b), "processor\t:")
}

// procCPU is the CPU time (user+system) of process pid so far, and its
// resident memory.
func procCPU(pid int) (time.Duration, int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0, err
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	if len(f) < 22 {
		return 0, 0, errors.New("short /proc stat")
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	rss, _ := strconv.ParseInt(f[21], 10, 64)
	return time.Duration(ut+st) * (time.Second / 100), rss * int64(os.Getpagesize()), nil
}
