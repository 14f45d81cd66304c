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
)

const heartbeatRoute = "POST /v1/hosts/{name}/heartbeat"

// heartbeats are the manager's own counts of heartbeat requests: by
// status code, and the latency histogram of the successful ones.
type heartbeats struct {
	byCode  map[string]uint64
	buckets map[float64]uint64 // upper bound → cumulative count (204s)
	count   uint64
	dbBytes float64
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
	hb := heartbeats{byCode: map[string]uint64{}, buckets: map[float64]uint64{}}
	if f := fams["vigil_api_request_duration_seconds"]; f != nil {
		for _, m := range f.Metric {
			if label(m, "route") != heartbeatRoute {
				continue
			}
			h := m.GetHistogram()
			code := label(m, "code")
			hb.byCode[code] += h.GetSampleCount()
			if code == "204" {
				hb.count += h.GetSampleCount()
				for _, bk := range h.Bucket {
					hb.buckets[bk.GetUpperBound()] += bk.GetCumulativeCount()
				}
			}
		}
	}
	if f := fams["vigil_etcd_db_size_bytes"]; f != nil && len(f.Metric) > 0 {
		hb.dbBytes = f.Metric[0].GetGauge().GetValue()
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

// quantile estimates the q quantile of the heartbeats between a and b from
// their histogram buckets (the upper bound of the bucket it falls in).
func quantile(a, b heartbeats, q float64) string {
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

// steadyState measures d of steady operation: heartbeats (rate, failures,
// latency), the manager's CPU and memory, API latency, etcd's writes.
func (s *sim) steadyState(ctx context.Context, d time.Duration, nHosts int) error {
	ecli, err := clientv3.New(clientv3.Config{Endpoints: []string{"unix://" + filepath.Join(s.tmp, "manager", "etcd", "client.sock")}, DialTimeout: 5 * time.Second})
	if err != nil {
		return err
	}
	defer ecli.Close()
	rev0, size0 := etcdStatus(ctx, ecli)
	a, _, _, err := scrape(ctx, s.c)
	if err != nil {
		return err
	}
	cpu0, _, err := procCPU(s.pid)
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
	var getOne, page100, byHost []time.Duration
	down := 0
	for time.Since(t0) < d {
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
	}
	el := time.Since(t0)
	cpu1, rss, err := procCPU(s.pid)
	if err != nil {
		return err
	}
	b, size, took, err := scrape(ctx, s.c)
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
	rev1, size1 := etcdStatus(ctx, ecli)
	ok := b.byCode["204"] - a.byCode["204"]
	var failed uint64
	var codes []string
	for code, n := range b.byCode {
		if code != "204" && n > a.byCode[code] {
			failed += n - a.byCode[code]
			codes = append(codes, fmt.Sprintf("%s×%d", code, n-a.byCode[code]))
		}
	}
	want := float64(nHosts) * el.Seconds()
	s.line("## Steady state (%s)", el.Round(time.Second))
	s.line("")
	s.line("| Measure | Value |")
	s.line("|---|---|")
	s.line("| Heartbeats taken | %d (%.0f/s; %d hosts at 1/s would send %.0f/s): %.1f%% |", ok, float64(ok)/el.Seconds(), nHosts, float64(nHosts), 100*float64(ok)/want)
	s.line("| Heartbeats refused or failed | %d %s |", failed, strings.Join(codes, " "))
	s.line("| Heartbeat latency at the manager (histogram) | p50 %s, p99 %s |", quantile(a, b, 0.5), quantile(a, b, 0.99))
	s.line("| Hosts not up at the end | %d of %d |", down, nHosts)
	s.line("| Manager CPU | %.2f cores (%.2f ms per heartbeat) |", (cpu1-cpu0).Seconds()/el.Seconds(), float64((cpu1-cpu0).Milliseconds())/math.Max(1, float64(ok)))
	s.line("| Manager memory (RSS) | %.0f MiB |", float64(rss)/(1<<20))
	s.line("| GET one VM | p50 %s, p99 %s (%d requests) |", pct(getOne, 50), pct(getOne, 99), len(getOne))
	s.line("| GET /v1/vms?limit=100 | p50 %s, p99 %s |", pct(page100, 50), pct(page100, 99))
	s.line("| GET /v1/vms?host=H (every page) | p50 %s, p99 %s |", pct(byHost, 50), pct(byHost, 99))
	s.line("| GET /metrics | %s, %.0f KB |", took.Round(time.Millisecond), float64(size)/1000)
	s.line("| etcd writes | %.0f revisions/s |", float64(rev1-rev0)/el.Seconds())
	s.line("| etcd database | %.1f MiB → %.1f MiB |", float64(size0)/(1<<20), float64(size1)/(1<<20))
	s.line("")
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
	evs, err := s.c.Events(ctx, 1<<62, "", true)
	if err != nil {
		return err
	}
	type ev struct {
		e api.Event
		t time.Time
	}
	ch := make(chan ev, 1024)
	go func() {
		for {
			e, err := evs.Next()
			if err != nil {
				close(ch)
				return
			}
			ch <- ev{e, time.Now()}
		}
	}()
	t0 := time.Now()
	victim.cancel()
	<-victim.done
	var dead time.Time
	moved := map[string]time.Time{}
	want := map[string]bool{}
	for _, vm := range mine {
		want[vm.Name] = true
	}
	timeout := time.After(deadAfter + 2*time.Minute)
	for dead.IsZero() || len(moved) < len(want) {
		select {
		case x, ok := <-ch:
			if !ok {
				return fmt.Errorf("the event stream ended")
			}
			switch {
			case x.e.Type == "host.dead" && x.e.Host == victim.name:
				dead = x.t
			case x.e.Type == "vm.state" && want[x.e.VM] && x.e.State == api.StateRunning && x.e.Host != victim.name && !dead.IsZero():
				moved[x.e.VM] = x.t
			}
		case <-timeout:
			return fmt.Errorf("after %s: host dead %v, %d of %d vms running elsewhere", time.Since(t0).Round(time.Second), !dead.IsZero(), len(moved), len(want))
		}
	}
	var last time.Time
	for _, t := range moved {
		if t.After(last) {
			last = t
		}
	}
	s.line("## Host death")
	s.line("")
	s.line("Host %s (%d VMs) stopped (heartbeats and server, as a crash); --host-dead-after %s.", victim.name, len(want), deadAfter)
	s.line("")
	s.line("| Measure | Value |")
	s.line("|---|---|")
	s.line("| Declared dead after | %s |", dead.Sub(t0).Round(time.Millisecond))
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
