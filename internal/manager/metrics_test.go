package manager

import (
	"context"
	"encoding/json"
	"net/http"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/vigil-project/vigil/api"
)

// TestMetrics scrapes /metrics with a viewer's token: the cluster's VMs and
// hosts, the API's own latency and the operations are there, the text is
// valid Prometheus exposition (and passes promtool's lint where promtool is
// installed, as .ci/run does), and no token gets no metrics.
func TestMetrics(t *testing.T) {
	m, _ := newTestManager(t)
	ctx := context.Background()
	if _, err := m.Create(ctx, api.VMCreateRequest{Name: "web", MemoryBytes: 128 << 20, CPUs: 1, DiskBytes: 256 << 20, Start: true}); err != nil {
		t.Fatal(err)
	}
	if _, err := m.ChangeState(ctx, "web", api.VMStateRequest{Action: api.ActionPause}); err != nil {
		t.Fatal(err)
	}
	viewer := token(t, m, "scraper", RoleViewer, 0)
	if code, _ := request(t, m, "GET", "/metrics", "", "", nil); code != 401 {
		t.Fatalf("metrics without a token: %d, want 401", code)
	}
	request(t, m, "GET", "/v1/vms", "", viewer, nil)
	code, body := request(t, m, "GET", "/metrics", "", viewer, nil)
	if code != 200 {
		t.Fatalf("metrics: %d %s", code, body)
	}
	p := expfmt.NewTextParser(model.LegacyValidation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("not Prometheus text: %v\n%s", err, body)
	}
	has := func(name string, labels map[string]string) bool {
		f, ok := fams[name]
		if !ok {
			return false
		}
	next:
		for _, mt := range f.Metric {
			for k, v := range labels {
				found := false
				for _, lp := range mt.Label {
					if lp.GetName() == k && lp.GetValue() == v {
						found = true
					}
				}
				if !found {
					continue next
				}
			}
			return true
		}
		return false
	}
	for _, want := range []struct {
		name   string
		labels map[string]string
	}{
		{"vigil_vm_info", map[string]string{"vm": "web", "host": "h1", "state": "paused"}},
		{"vigil_vm_memory_bytes", map[string]string{"vm": "web"}},
		{"vigil_vm_running", map[string]string{"vm": "web"}},
		{"vigil_host_up", map[string]string{"host": "h1"}},
		{"vigil_host_memory_reserved_bytes", map[string]string{"host": "h1"}},
		{"vigil_manager_leader", nil},
		{"vigil_workqueue_depth", nil},
		{"vigil_api_request_duration_seconds", map[string]string{"route": "GET /v1/vms", "code": "200"}},
		{"vigil_vm_operation_duration_seconds", map[string]string{"action": "pause"}},
		{"process_cpu_seconds_total", nil},
		{"go_sched_latencies_seconds", nil},
		{"go_cpu_classes_gc_total_cpu_seconds_total", nil},
	} {
		if !has(want.name, want.labels) {
			t.Errorf("no %s with %v", want.name, want.labels)
		}
	}
	if f := fams["vigil_api_request_duration_seconds"]; f != nil && f.GetType().String() != "HISTOGRAM" {
		t.Errorf("api latency is a %s", f.GetType())
	}
	for name := range fams {
		if !model.LegacyValidation.IsValidMetricName(name) || !strings.HasPrefix(name, "vigil_") && !strings.HasPrefix(name, "promhttp_") &&
			!strings.HasPrefix(name, "go_") && !strings.HasPrefix(name, "process_") {
			t.Errorf("metric name %q", name)
		}
	}
	if promtool, err := exec.LookPath("promtool"); err == nil {
		cmd := exec.Command(promtool, "check", "metrics")
		cmd.Stdin = strings.NewReader(body)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("promtool check metrics: %v\n%s", err, out)
		}
	} else if testing.Short() {
		t.Log("promtool is not installed: the text was checked with the Prometheus parser only")
	} else {
		t.Fatal("promtool is not installed (apt-get install prometheus; .ci/run installs it)")
	}
}

// TestClusterViewsWithoutTheStore: when the store stops answering, the
// host list and the metrics still show the VMs' reservations, from the
// mirror as it stands, in bounded time; the metrics say that part is not
// fresh.
func TestClusterViewsWithoutTheStore(t *testing.T) {
	ms, _, etcd := newTestManagersOn(t, 1)
	m := ms[0]
	ctx := context.Background()
	if _, err := m.Create(ctx, api.VMCreateRequest{Name: "web", MemoryBytes: 128 << 20, CPUs: 1, DiskBytes: 256 << 20, Start: true}); err != nil {
		t.Fatal(err)
	}
	viewer := token(t, m, "watch", RoleViewer, 0)
	waitMirror(t, m)
	etcd.Close()

	t0 := time.Now()
	code, body := request(t, m, "GET", "/v1/hosts", "", viewer, nil)
	var hs []api.Host
	if err := json.Unmarshal([]byte(body), &hs); code != http.StatusOK || err != nil || len(hs) != 1 {
		t.Fatalf("hosts without the store: %d %s", code, body)
	}
	if hs[0].ReservedMemoryBytes != 128<<20 {
		t.Fatalf("hosts without the store: %d bytes reserved, want the mirror's 128 MiB", hs[0].ReservedMemoryBytes)
	}
	code, body = request(t, m, "GET", "/metrics", "", viewer, nil)
	if code != http.StatusOK {
		t.Fatalf("metrics without the store: %d %s", code, body)
	}
	for _, want := range []string{`vigil_vm_info{`, `vigil_scrape_error{what="vms"} 1`} {
		if !strings.Contains(body, want) {
			t.Errorf("metrics without the store lack %s", want)
		}
	}
	if d := time.Since(t0); d > 3*currentAnswer {
		t.Errorf("the two views took %s without the store, want at most %s each", d, currentAnswer)
	}
}
