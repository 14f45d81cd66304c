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
	"crypto/tls"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
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
	var o options
	flag.IntVar(&o.hosts, "hosts", 100, "simulated hosts")
	flag.IntVar(&o.vms, "vms", 20, "VMs per host")
	flag.IntVar(&o.managers, "managers", 1, "managers: 1 (embedded etcd) or 3 (an embedded etcd cluster of three; hosts spread over them)")
	flag.DurationVar(&o.steady, "steady", time.Minute, "how long to measure the steady state")
	flag.DurationVar(&o.sample, "sample", 0, "with a long -steady: a line of the time series every this long (default: steady/6)")
	flag.DurationVar(&o.deadAfter, "host-dead-after", 8*time.Second, "the managers' --host-dead-after")
	flag.StringVar(&o.faults, "faults", "kill,freeze,manager", "faults to inject after the steady state, in order: kill (a host crashes), freeze (a host hangs, then wakes), manager (the leading manager is killed; with -managers 3)")
	out := flag.String("out", "", "also write the report (markdown) here")
	flag.IntVar(&o.workers, "workers", 8, "concurrent API calls while creating VMs")
	flag.BoolVar(&o.keep, "keep", false, "keep the managers' data and logs (printed at the end) instead of removing them")
	flag.Parse()
	if o.managers != 1 && o.managers != 3 {
		fmt.Fprintln(os.Stderr, "vigil-sim: -managers is 1 or 3")
		os.Exit(2)
	}
	if o.sample == 0 {
		o.sample = max(10*time.Second, o.steady/6)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	report, err := run(ctx, o)
	fmt.Print(report)
	if *out != "" && report != "" {
		os.WriteFile(*out, []byte(report), 0o644)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "vigil-sim:", err)
		os.Exit(1)
	}
}

type options struct {
	hosts, vms, managers, workers int
	steady, sample, deadAfter     time.Duration
	faults                        string
	keep                          bool
}

type sim struct {
	c      *client.Client // the API, through a manager that stays up
	mgrs   []*mgr
	tmp    string
	hosts  []*simulated
	report strings.Builder
	// relocated is when the last record of a dead host's VMs moved (set
	// by awaitMoved).
	relocated time.Time
}

// mgr is one manager process.
type mgr struct {
	name, addr, dir string
	cmd             *exec.Cmd
	c               *client.Client
	gone            bool // killed by a fault
}

func (m *mgr) url() string { return "https://" + m.addr }

type simulated struct {
	name   string
	host   *simhost.Host
	cancel context.CancelFunc
	done   chan error
	// dead: stopped by a fault (its map of VMs is left as it was);
	// frozen: hung by one (reading it would wait).
	dead   bool
	frozen atomic.Bool
}

func (s *sim) line(format string, args ...any) {
	fmt.Fprintf(&s.report, format+"\n", args...)
	fmt.Fprintf(os.Stderr, "vigil-sim: "+format+"\n", args...)
}

// live are the managers not killed by a fault.
func (s *sim) live() []*mgr {
	var out []*mgr
	for _, m := range s.mgrs {
		if !m.gone {
			out = append(out, m)
		}
	}
	return out
}

func run(ctx context.Context, o options) (string, error) {
	bin := filepath.Join(os.Getenv("VIGIL_BIN"), "vigil")
	if _, err := os.Stat(bin); err != nil {
		return "", fmt.Errorf("set VIGIL_BIN to the directory holding the vigil binary: %w", err)
	}
	tmp, err := os.MkdirTemp("", "vigil-sim-")
	if err != nil {
		return "", err
	}
	if o.keep {
		defer fmt.Fprintln(os.Stderr, "vigil-sim: the managers' data and logs are kept in", tmp)
	} else {
		defer os.RemoveAll(tmp)
	}
	s := &sim{tmp: tmp}
	defer func() {
		for _, m := range s.mgrs {
			if !m.gone {
				m.cmd.Process.Signal(syscall.SIGKILL)
				m.cmd.Wait()
			}
		}
	}()
	if err := s.startManagers(ctx, bin, o.managers, o.deadAfter); err != nil {
		return "", err
	}
	what := "one manager (embedded etcd)"
	if o.managers > 1 {
		what = fmt.Sprintf("%d managers (an embedded etcd cluster of %d; each host heartbeats to one of them, spread evenly)", o.managers, o.managers)
	}
	s.line("# vigil-sim: %d hosts × %d VMs, %s, host-dead-after %s", o.hosts, o.vms, what, o.deadAfter)
	s.line("")
	s.line("Started %s on this machine (%d CPUs); the simulator and the managers share it.", time.Now().UTC().Format(time.RFC3339), numCPU())
	s.line("")

	t0 := time.Now()
	if err := s.startHosts(ctx, o.hosts, o.deadAfter); err != nil {
		return s.report.String(), err
	}
	s.line("- %d hosts joined (join token, certificate, registration) in %s", o.hosts, time.Since(t0).Round(time.Millisecond))
	t0 = time.Now()
	k0 := s.counts()
	createLat, err := s.createVMs(ctx, o.hosts*o.vms, o.workers)
	if err != nil {
		return s.report.String(), err
	}
	k1 := s.counts()
	s.line("- %d VMs created and started through the API in %s (%d at a time): create p50 %s, p99 %s",
		o.hosts*o.vms, time.Since(t0).Round(time.Millisecond), o.workers, pct(createLat, 50), pct(createLat, 99))
	s.line("- Meanwhile: %d VM starts on the hosts (%d more than the VMs created), %d fences of hosts cut off from every manager killing %d VMs",
		k1.Starts-k0.Starts, k1.Starts-k0.Starts-int64(o.hosts*o.vms), k1.Fences-k0.Fences, k1.FencedVMs-k0.FencedVMs)
	s.line("")
	if err := s.steadyState(ctx, o); err != nil {
		return s.report.String(), err
	}
	for _, f := range strings.Split(o.faults, ",") {
		switch strings.TrimSpace(f) {
		case "":
		case "kill":
			err = s.hostDeath(ctx, o.deadAfter)
		case "freeze":
			err = s.hostFreeze(ctx, o.deadAfter)
		case "manager":
			if o.managers > 1 {
				err = s.managerDrop(ctx, o.deadAfter)
			}
		default:
			err = fmt.Errorf("unknown fault %q: use kill, freeze or manager", f)
		}
		if err != nil {
			return s.report.String(), err
		}
	}
	return s.report.String(), nil
}

// startManagers starts n manager processes and waits until one leads.
func (s *sim) startManagers(ctx context.Context, bin string, n int, deadAfter time.Duration) error {
	var peers []string
	for i := 0; i < n; i++ {
		addr, err := freeAddr()
		if err != nil {
			return err
		}
		m := &mgr{name: fmt.Sprintf("m%d", i+1), addr: addr, dir: filepath.Join(s.tmp, fmt.Sprintf("manager%d", i+1))}
		s.mgrs = append(s.mgrs, m)
		if n > 1 {
			p, err := freeAddr()
			if err != nil {
				return err
			}
			peers = append(peers, fmt.Sprintf("%s=http://%s", m.name, p))
		}
	}
	for _, m := range s.mgrs {
		args := []string{"agent", "--manager", "--listen", m.addr, "--data-dir", m.dir,
			"--host-dead-after", deadAfter.String(), "--log-level", "warn"}
		if n > 1 {
			args = append(args, "--name", m.name, "--etcd-peers", strings.Join(peers, ","))
		}
		m.cmd = exec.CommandContext(ctx, bin, args...)
		logf, _ := os.Create(m.dir + ".log")
		m.cmd.Stdout, m.cmd.Stderr = logf, logf
		if err := m.cmd.Start(); err != nil {
			return err
		}
	}
	for t0 := time.Now(); ; time.Sleep(100 * time.Millisecond) {
		ready := 0
		for _, m := range s.mgrs {
			if m.c == nil {
				if _, err := os.Stat(filepath.Join(m.dir, "client.yaml")); err == nil {
					m.c = clientFor(m.dir)
				}
			}
			if m.c != nil {
				if _, err := m.c.Hosts(ctx); err == nil {
					ready++
				}
			}
		}
		if ready == n && s.leader() != nil {
			break
		}
		if time.Since(t0) > time.Minute {
			b, _ := os.ReadFile(s.mgrs[0].dir + ".log")
			return fmt.Errorf("%d of %d managers up after a minute:\n%s", ready, n, b)
		}
	}
	s.c = s.mgrs[0].c
	return nil
}

// leader is the manager that says it leads, if any.
func (s *sim) leader() *mgr {
	for _, m := range s.live() {
		if leading(m.addr) {
			return m
		}
	}
	return nil
}

func leading(addr string) bool {
	// /v1/health needs no token; only its leader flag is read.
	c := &http.Client{Timeout: 500 * time.Millisecond, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	resp, err := c.Get("https://" + addr + "/v1/health")
	if err != nil {
		return false
	}
	defer resp.Body.Close()
	var h struct {
		Leader bool `json:"leader"`
	}
	json.NewDecoder(resp.Body).Decode(&h)
	return h.Leader
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
		var urls []string // rotated: host i reports to manager i mod n first
		for k := range s.mgrs {
			urls = append(urls, s.mgrs[(i+k)%len(s.mgrs)].url())
		}
		cfg := agent.HostConfig{Name: name, DataDir: filepath.Join(s.tmp, "hosts", name), Listen: "127.0.0.1:0",
			Managers: urls, JoinToken: tok.Token, FenceAfter: fence,
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
