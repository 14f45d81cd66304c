package main

import (
	"bytes"
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"path/filepath"
	"sort"
	"strings"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/client"
	"github.com/vigil-project/vigil/internal/simhost"
)

const (
	heartbeatRoute = "POST /v1/hosts/{name}/heartbeat"
	sameRoute      = "POST /v1/hosts/{name}/heartbeat/same" // heartbeats that say Same
	getRoute       = "GET /v1/vms/{name}"
)

// hist is a latency histogram's buckets: upper bound → cumulative count.
type hist struct {
	buckets map[float64]uint64
	count   uint64
}

func (h *hist) add(o *dto.Histogram) {
	if h.buckets == nil {
		h.buckets = map[float64]uint64{}
	}
	h.count += o.GetSampleCount()
	for _, bk := range o.Bucket {
		h.buckets[bk.GetUpperBound()] += bk.GetCumulativeCount()
	}
}

func (h *hist) sum(o hist) {
	if h.buckets == nil {
		h.buckets = map[float64]uint64{}
	}
	h.count += o.count
	for k, v := range o.buckets {
		h.buckets[k] += v
	}
}

// heartbeats are the managers' own counts of heartbeat requests (by status
// code, and the latency histogram of the successful ones) and the latency
// histogram of their successful GETs of one VM, as the managers measured
// them: the simulator's own clients wait for the same two cores.
type heartbeats struct {
	byCode  map[string]uint64
	beats   hist // 204s
	get     hist // 200s of GET one VM
	dbBytes float64
	// sched is how long the managers' runnable goroutines waited for a
	// thread; gcCPU and cpu their garbage collector's CPU and all of it.
	sched      hist
	gcCPU, cpu float64
}

func scrape(ctx context.Context, c *client.Client) (heartbeats, int, time.Duration, error) {
	t0 := time.Now()
	b, err := c.Metrics(ctx)
	took := time.Since(t0)
	if err != nil {
		return heartbeats{}, 0, 0, err
	}
	p := expfmt.NewTextParser(model.LegacyValidation)
	fams, err := p.TextToMetricFamilies(bytes.NewReader(b))
	if err != nil {
		return heartbeats{}, 0, 0, fmt.Errorf("parse /metrics: %w", err)
	}
	hb := heartbeats{byCode: map[string]uint64{}}
	if f := fams["vigil_api_request_duration_seconds"]; f != nil {
		for _, m := range f.Metric {
			h, code := m.GetHistogram(), label(m, "code")
			switch label(m, "route") {
			case heartbeatRoute, sameRoute:
				hb.byCode[code] += h.GetSampleCount()
				if code == "204" {
					hb.beats.add(h)
				}
			case getRoute:
				if code == "200" {
					hb.get.add(h)
				}
			}
		}
	}
	if f := fams["vigil_etcd_db_size_bytes"]; f != nil && len(f.Metric) > 0 {
		hb.dbBytes = f.Metric[0].GetGauge().GetValue()
	}
	if f := fams["go_sched_latencies_seconds"]; f != nil && len(f.Metric) > 0 {
		hb.sched.add(f.Metric[0].GetHistogram())
	}
	if f := fams["go_cpu_classes_gc_total_cpu_seconds_total"]; f != nil && len(f.Metric) > 0 {
		hb.gcCPU = f.Metric[0].GetCounter().GetValue()
	}
	if f := fams["process_cpu_seconds_total"]; f != nil && len(f.Metric) > 0 {
		hb.cpu = f.Metric[0].GetCounter().GetValue()
	}
	return hb, len(b), took, nil
}

func label(m *dto.Metric, name string) string {
	for _, l := range m.Label {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}

// quantile estimates the q quantile of the requests between a and b from
// their histogram buckets (the upper bound of the bucket it falls in).
func quantile(a, b hist, q float64) string {
	n := b.count - a.count
	if n == 0 {
		return "-"
	}
	bounds := make([]float64, 0, len(b.buckets))
	for ub := range b.buckets {
		bounds = append(bounds, ub)
	}
	sort.Float64s(bounds)
	want := uint64(math.Ceil(q * float64(n)))
	for _, ub := range bounds {
		if b.buckets[ub]-a.buckets[ub] >= want {
			if math.IsInf(ub, 1) {
				return "> largest bucket"
			}
			return fmt.Sprintf("≤ %s", time.Duration(ub*float64(time.Second)))
		}
	}
	return "?"
}

// scrapeAll sums the heartbeat counts of every live manager (each counts
// those it took); the size and time are those of the API manager's.
func (s *sim) scrapeAll(ctx context.Context) (heartbeats, int, time.Duration, error) {
	sum := heartbeats{byCode: map[string]uint64{}}
	var size int
	var took time.Duration
	for _, m := range s.live() {
		hb, n, d, err := scrape(ctx, m.c)
		if err != nil {
			return sum, 0, 0, fmt.Errorf("metrics of %s: %w", m.name, err)
		}
		for k, v := range hb.byCode {
			sum.byCode[k] += v
		}
		sum.beats.sum(hb.beats)
		sum.get.sum(hb.get)
		sum.sched.sum(hb.sched)
		sum.gcCPU += hb.gcCPU
		sum.cpu += hb.cpu
		if m.c == s.c {
			size, took, sum.dbBytes = n, d, hb.dbBytes
		}
	}
	return sum, size, took, nil
}

// counts sums what every simulated host did: VM starts and fences.
func (s *sim) counts() simhost.Counts {
	var c simhost.Counts
	for _, h := range s.hosts {
		c = c.Add(h.host.Counts())
	}
	return c
}

// usage is the CPU time and resident memory of every live manager.
func (s *sim) usage() (time.Duration, int64, error) {
	var cpu time.Duration
	var rss int64
	for _, m := range s.live() {
		c, r, err := procCPU(m.cmd.Process.Pid)
		if err != nil {
			return 0, 0, err
		}
		cpu, rss = cpu+c, rss+r
	}
	return cpu, rss, nil
}

// etcdAll is the store's revision and each live member's database size.
func (s *sim) etcdAll(ctx context.Context) (int64, []int64) {
	var rev int64
	var sizes []int64
	for _, m := range s.live() {
		cli, err := clientv3.New(clientv3.Config{Endpoints: []string{"unix://" + filepath.Join(m.dir, "etcd", "client.sock")}, DialTimeout: 5 * time.Second})
		if err != nil {
			continue
		}
		r, size := etcdStatus(ctx, cli)
		cli.Close()
		rev = max(rev, r)
		sizes = append(sizes, size)
	}
	return rev, sizes
}

func mib(sizes []int64) string {
	var out []string
	for _, b := range sizes {
		out = append(out, fmt.Sprintf("%.1f", float64(b)/(1<<20)))
	}
	return strings.Join(out, " / ") + " MiB"
}

// steadyState measures o.steady of steady operation: heartbeats (rate,
// failures, latency), the managers' CPU and memory, API latency, etcd's
// writes and size, with a line of the time series every o.sample.
func (s *sim) steadyState(ctx context.Context, o options) error {
	rev0, size0 := s.etcdAll(ctx)
	a, _, _, err := s.scrapeAll(ctx)
	if err != nil {
		return err
	}
	cpu0, _, err := s.usage()
	if err != nil {
		return err
	}
	t0 := time.Now()
	// API latency through the window, sequentially: one VM, a page of a
	// hundred, a whole host's VMs.
	vms, _, err := s.c.VMsPage(ctx, client.ListOptions{Limit: 1000})
	if err != nil {
		return err
	}
	type point struct {
		at    time.Duration
		beats uint64
		cpu   time.Duration
		rss   int64
		rev   int64
		sizes []int64
		sim   simhost.Counts
	}
	k0 := s.counts()
	series := []point{{0, a.beats.count, cpu0, 0, rev0, size0, k0}}
	var getOne, page100, byHost []time.Duration
	down := 0
	for time.Since(t0) < o.steady {
		for i := 0; i < 20; i++ {
			name := vms[rand.IntN(len(vms))].Name
			t := time.Now()
			if _, err := s.c.VM(ctx, name); err != nil {
				return fmt.Errorf("get %s: %w", name, err)
			}
			getOne = append(getOne, time.Since(t))
		}
		t := time.Now()
		if _, _, err := s.c.VMsPage(ctx, client.ListOptions{Limit: 100, Continue: ""}); err != nil {
			return err
		}
		page100 = append(page100, time.Since(t))
		t = time.Now()
		if _, err := s.c.AllVMs(ctx, client.ListOptions{Host: s.hosts[rand.IntN(len(s.hosts))].name}); err != nil {
			return err
		}
		byHost = append(byHost, time.Since(t))
		time.Sleep(time.Second)
		if el := time.Since(t0); el-series[len(series)-1].at >= o.sample && el < o.steady {
			hb, _, _, err := s.scrapeAll(ctx)
			if err != nil {
				return err
			}
			cpu, rss, err := s.usage()
			if err != nil {
				return err
			}
			rev, sizes := s.etcdAll(ctx)
			series = append(series, point{el, hb.beats.count, cpu, rss, rev, sizes, s.counts()})
		}
	}
	el := time.Since(t0)
	cpu1, rss, err := s.usage()
	if err != nil {
		return err
	}
	b, size, took, err := s.scrapeAll(ctx)
	if err != nil {
		return err
	}
	hs, err := s.c.Hosts(ctx)
	if err != nil {
		return err
	}
	for _, h := range hs {
		if h.State != "up" {
			down++
		}
	}
	rev1, size1 := s.etcdAll(ctx)
	k1 := s.counts()
	series = append(series, point{el, b.beats.count, cpu1, rss, rev1, size1, k1})
	ok := b.byCode["204"] - a.byCode["204"]
	var failed uint64
	var codes []string
	for code, n := range b.byCode {
		// 409: the manager did not hold the report a heartbeat said
		// Same for; the host sends it in full at once (reported below).
		if code != "204" && code != "409" && n > a.byCode[code] {
			failed += n - a.byCode[code]
			codes = append(codes, fmt.Sprintf("%s×%d", code, n-a.byCode[code]))
		}
	}
	want := float64(len(s.hosts)) * el.Seconds()
	cores := (cpu1 - cpu0).Seconds() / el.Seconds()
	s.line("## Steady state (%s)", el.Round(time.Second))
	s.line("")
	s.line("| Measure | Value |")
	s.line("|---|---|")
	s.line("| Heartbeats taken | %d (%.0f/s; %d hosts at 1/s would send %d/s): %.1f%% |", ok, float64(ok)/el.Seconds(), len(s.hosts), len(s.hosts), 100*float64(ok)/want)
	s.line("| Heartbeats refused or failed | %d %s |", failed, strings.Join(codes, " "))
	s.line("| Heartbeats answered \"send the full report\" (409, sent again at once) | %d |", b.byCode["409"]-a.byCode["409"])
	s.line("| Heartbeat latency at the managers (histogram) | p50 %s, p99 %s |", quantile(a.beats, b.beats, 0.5), quantile(a.beats, b.beats, 0.99))
	s.line("| Hosts not up at the end | %d of %d |", down, len(s.hosts))
	s.line("| Hosts' fences (cut off from every manager for the fence time) | %d, killing %d VMs |", k1.Fences-k0.Fences, k1.FencedVMs-k0.FencedVMs)
	s.line("| VM starts on the hosts (each a restart here) | %d |", k1.Starts-k0.Starts)
	s.line("| Managers' CPU (etcd included; %d process(es)) | %.2f cores (%.2f ms per heartbeat) |", len(s.live()), cores, float64((cpu1-cpu0).Milliseconds())/math.Max(1, float64(ok)))
	s.line("| Managers' memory (RSS, summed) | %.0f MiB |", float64(rss)/(1<<20))
	s.line("| GET one VM, at the simulator's client | p50 %s, p99 %s (%d requests) |", pct(getOne, 50), pct(getOne, 99), len(getOne))
	s.line("| GET one VM, at the manager (histogram) | p50 %s, p99 %s |", quantile(a.get, b.get, 0.5), quantile(a.get, b.get, 0.99))
	s.line("| Managers' runnable goroutines waiting for a thread (go_sched_latencies_seconds) | p50 %s, p99 %s |", quantile(a.sched, b.sched, 0.5), quantile(a.sched, b.sched, 0.99))
	if d := b.cpu - a.cpu; d > 0 {
		s.line("| Managers' Go garbage collector (the runtime's estimate) | %.0f%% of their CPU time |", 100*(b.gcCPU-a.gcCPU)/d)
	}
	s.line("| GET /v1/vms?limit=100 | p50 %s, p99 %s |", pct(page100, 50), pct(page100, 99))
	s.line("| GET /v1/vms?host=H (every page) | p50 %s, p99 %s |", pct(byHost, 50), pct(byHost, 99))
	s.line("| GET /metrics | %s, %.0f KB |", took.Round(time.Millisecond), float64(size)/1000)
	s.line("| etcd writes | %.0f revisions/s |", float64(rev1-rev0)/el.Seconds())
	s.line("| etcd database (each member) | %s → %s |", mib(size0), mib(size1))
	s.line("")
	if len(series) > 2 {
		s.line("Over time (each line: the interval since the previous one):")
		s.line("")
		s.line("| At | Heartbeats/s | Managers' CPU (cores) | Managers' RSS | etcd writes/s | etcd database | VMs fenced | VM starts |")
		s.line("|---|---|---|---|---|---|---|---|")
		for i := 1; i < len(series); i++ {
			p, q := series[i-1], series[i]
			d := (q.at - p.at).Seconds()
			s.line("| %s | %.0f | %.2f | %.0f MiB | %.0f | %s | %d | %d |", q.at.Round(time.Second), float64(q.beats-p.beats)/d,
				(q.cpu-p.cpu).Seconds()/d, float64(q.rss)/(1<<20), float64(q.rev-p.rev)/d, mib(q.sizes),
				q.sim.FencedVMs-p.sim.FencedVMs, q.sim.Starts-p.sim.Starts)
		}
		s.line("")
	}
	return nil
}

func etcdStatus(ctx context.Context, cli *clientv3.Client) (int64, int64) {
	sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	st, err := cli.Status(sctx, cli.Endpoints()[0])
	if err != nil {
		return 0, 0
	}
	return st.Header.Revision, st.DbSize
}

// hostDeath stops one simulated host (its heartbeats and its server, as a
// crash would) and times the manager: until it declares the host dead,
// and until every VM of it runs on another host.
func (s *sim) hostDeath(ctx context.Context, deadAfter time.Duration) error {
	victim := s.hosts[len(s.hosts)/2]
	mine, err := s.c.AllVMs(ctx, client.ListOptions{Host: victim.name})
	if err != nil {
		return err
	}
	ch, err := s.events(ctx)
	if err != nil {
		return err
	}
	t0 := time.Now()
	victim.cancel()
	<-victim.done
	victim.dead = true
	dead, last, err := s.awaitMoved(ch, victim.name, mine, t0, deadAfter)
	if err != nil {
		return err
	}
	want := mine
	s.line("## Host death")
	s.line("")
	s.line("Host %s (%d VMs) stopped (heartbeats and server, as a crash); --host-dead-after %s.", victim.name, len(want), deadAfter)
	s.line("")
	s.line("| Measure | Value |")
	s.line("|---|---|")
	s.line("| Declared dead after | %s |", dead.Sub(t0).Round(time.Millisecond))
	s.line("| Their records all moved to other hosts (vm.relocated) | %s after the death was declared |", s.relocated.Sub(dead).Round(time.Millisecond))
	s.line("| Its VMs all running on other hosts | %s after the death was declared (%s after the crash) |", last.Sub(dead).Round(time.Millisecond), last.Sub(t0).Round(time.Millisecond))
	s.line("| Target | acted on within the detection time + 1 s: %s |", map[bool]string{true: "met", false: "not met"}[last.Sub(t0) <= deadAfter+time.Second])
	s.line("")
	return nil
}

func pct(ds []time.Duration, q int) string {
	if len(ds) == 0 {
		return "-"
	}
	x := append([]time.Duration(nil), ds...)
	sort.Slice(x, func(i, j int) bool { return x[i] < x[j] })
	i := (len(x)*q + 99) / 100
	if i > 0 {
		i--
	}
	return x[i].Round(10 * time.Microsecond).String()
}

type ev struct {
	e api.Event
	t time.Time
}

// events follows the API manager's event stream from now on.
func (s *sim) events(ctx context.Context) (<-chan ev, error) {
	evs, err := s.c.Events(ctx, 1<<62, "", true)
	if err != nil {
		return nil, err
	}
	ch := make(chan ev, 4096)
	go func() {
		defer close(ch)
		for {
			e, err := evs.Next()
			if err != nil {
				return
			}
			select {
			case ch <- ev{e, time.Now()}:
			case <-ctx.Done():
				return
			}
		}
	}()
	return ch, nil
}

// awaitMoved waits until host is declared dead and every VM of mine runs
// on another host, and returns when each happened.
func (s *sim) awaitMoved(ch <-chan ev, host string, mine []api.VM, t0 time.Time, deadAfter time.Duration) (time.Time, time.Time, error) {
	var dead time.Time
	moved, relocated := map[string]time.Time{}, map[string]time.Time{}
	want := map[string]bool{}
	for _, vm := range mine {
		want[vm.Name] = true
	}
	timeout := time.After(deadAfter + 2*time.Minute)
	for dead.IsZero() || len(moved) < len(want) {
		select {
		case x, ok := <-ch:
			if !ok {
				return dead, time.Time{}, fmt.Errorf("the event stream ended")
			}
			switch {
			case x.e.Type == "host.dead" && x.e.Host == host:
				dead = x.t
			case x.e.Type == "vm.relocated" && want[x.e.VM]:
				relocated[x.e.VM] = x.t
			case x.e.Type == "vm.state" && want[x.e.VM] && x.e.State == api.StateRunning && x.e.Host != host && !dead.IsZero():
				moved[x.e.VM] = x.t
			}
		case <-timeout:
			return dead, time.Time{}, fmt.Errorf("after %s: host %s dead %v, %d of %d vms running elsewhere", time.Since(t0).Round(time.Second), host, !dead.IsZero(), len(moved), len(want))
		}
	}
	var last, lastRelocated time.Time
	for _, t := range moved {
		if t.After(last) {
			last = t
		}
	}
	for _, t := range relocated {
		if t.After(lastRelocated) {
			lastRelocated = t
		}
	}
	s.relocated = lastRelocated
	return dead, last, nil
}
