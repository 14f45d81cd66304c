package manager

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/hostproto"
)

// parseExposition reads text written by an exposition with Prometheus'
// own parser.
func parseExposition(t testing.TB, text string) map[string]map[string]float64 {
	t.Helper()
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(text))
	if err != nil {
		t.Fatalf("Prometheus cannot read it: %v\n%s", err, text)
	}
	out := map[string]map[string]float64{}
	for name, f := range fams {
		out[name] = map[string]float64{}
		for _, m := range f.Metric {
			var key []string
			for _, lp := range m.Label {
				if lp.GetValue() != "" { // an empty label is no label
					key = append(key, lp.GetName()+"="+lp.GetValue())
				}
			}
			slices.Sort(key)
			v := m.GetGauge().GetValue()
			if m.Counter != nil {
				v = m.GetCounter().GetValue()
			}
			out[name][strings.Join(key, ",")] = v
		}
	}
	return out
}

// TestExposition: samples of interleaved families come out grouped, with
// awkward label values and values as Prometheus reads them.
func TestExposition(t *testing.T) {
	a := &family{name: "t_a", typ: "gauge", help: `a help with a \ and a
line feed`, labels: []string{"vm", "host"}}
	b := &family{name: "t_b_total", typ: "counter", help: "b", labels: []string{"x"}}
	c := &family{name: "t_c", typ: "gauge", help: "no labels"}
	var e exposition
	e.add(a, 1, "web", "h1")
	e.add(b, 1e21, `quote " back \ nl
end`)
	e.add(a, 0.25, "db", "h2")
	e.add(c, math.Inf(1))
	e.add(b, 3, "ünïcode ✓")
	e.add(a, math.Inf(-1), "x", "")
	e.add(b, 5, "bad \xff byte")
	var buf bytes.Buffer
	if _, err := e.WriteTo(&buf); err != nil {
		t.Fatal(err)
	}
	got := parseExposition(t, buf.String())
	want := map[string]map[string]float64{
		"t_a":       {"host=h1,vm=web": 1, "host=h2,vm=db": 0.25, "vm=x": math.Inf(-1)},
		"t_b_total": {"x=quote \" back \\ nl\nend": 1e21, "x=ünïcode ✓": 3, "x=bad \uFFFD byte": 5},
		"t_c":       {"": math.Inf(1)},
	}
	for name, series := range want {
		for k, v := range series {
			if g, ok := got[name][k]; !ok || g != v {
				t.Errorf("%s{%s} = %v (present %v), want %v\n%s", name, k, g, ok, v, buf.String())
			}
		}
		if len(got[name]) != len(series) {
			t.Errorf("%s has %d series, want %d", name, len(got[name]), len(series))
		}
	}
	var nan exposition
	nan.add(c, math.NaN())
	buf.Reset()
	nan.WriteTo(&buf)
	if v := parseExposition(t, buf.String())["t_c"][""]; !math.IsNaN(v) {
		t.Errorf("NaN came back as %v", v)
	}
}

// FuzzExposition: whatever a label value holds (VM, host, image and pool
// names come from outside), Prometheus reads back that value.
func FuzzExposition(f *testing.F) {
	f.Add("web", "h1", 1.0)
	f.Add(`a"b\c`, "x\ny", -0.5)
	f.Add("", "\x00\xff", 1e308)
	f.Fuzz(func(t *testing.T, v1, v2 string, x float64) {
		if math.IsNaN(x) {
			t.Skip() // NaN is never equal to itself; TestExposition reads it back
		}
		fam := &family{name: "f", typ: "gauge", help: "h", labels: []string{"a", "b"}}
		var e exposition
		e.add(fam, x, v1, v2)
		var buf bytes.Buffer
		e.WriteTo(&buf)
		got := parseExposition(t, buf.String())["f"]
		// Bytes that are not UTF-8 come out as U+FFFD.
		v1, v2 = strings.ToValidUTF8(v1, "\uFFFD"), strings.ToValidUTF8(v2, "\uFFFD")
		var key []string
		if v1 != "" {
			key = append(key, "a="+v1)
		}
		if v2 != "" {
			key = append(key, "b="+v2)
		}
		if g, ok := got[strings.Join(key, ",")]; !ok || g != x || len(got) != 1 {
			t.Fatalf("wrote %q %q %v, read %v", v1, v2, x, got)
		}
	})
}

func TestGzipAccepted(t *testing.T) {
	for _, tc := range []struct {
		header string
		want   bool
	}{
		{"", false},
		{"gzip", true},
		{"identity", false},
		{"deflate, gzip;q=0.9", true},
		{"gzip;q=0", false},
		{"gzip; q=0.0", false},
		{"br,gzip ;q=0.001", true},
		{"xgzip", false},
		{"GZip", true},
		{"*", true},
		{"gzip;q=0.5;level=1", true},
		{"gzip;level=1;q=0", false},
	} {
		r := httptest.NewRequest("GET", "/metrics", nil)
		r.Header.Set("Accept-Encoding", tc.header)
		if got := gzipAccepted(r); got != tc.want {
			t.Errorf("%q: gzip %v, want %v", tc.header, got, tc.want)
		}
	}
}

// TestMetricsGzip: a scraper that takes gzip (Prometheus does) gets the
// same text, compressed.
func TestMetricsGzip(t *testing.T) {
	m, _ := newTestManager(t)
	viewer := token(t, m, "scraper", RoleViewer, 0)
	get := func(enc string) (string, string) {
		req := httptest.NewRequest("GET", "/metrics", nil)
		req.Header.Set("Authorization", "Bearer "+viewer)
		req.Header.Set("Accept-Encoding", enc)
		w := httptest.NewRecorder()
		m.Handler().ServeHTTP(w, req)
		if w.Code != 200 {
			t.Fatalf("metrics: %d %s", w.Code, w.Body.String())
		}
		return w.Header().Get("Content-Encoding"), w.Body.String()
	}
	enc, body := get("gzip")
	if enc != "gzip" {
		t.Fatalf("content encoding %q, want gzip", enc)
	}
	zr, err := gzip.NewReader(strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	text, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	fams := parseExposition(t, string(text))
	if _, ok := fams["vigil_manager_leader"]; !ok {
		t.Fatalf("no vigil_manager_leader in the gzipped text:\n%s", text)
	}
	if enc, _ := get("identity"); enc != "" {
		t.Fatalf("content encoding %q without gzip asked", enc)
	}
}

// BenchmarkMetrics20000VMs scrapes /metrics with 20,000 VM records in the
// mirror (on 20 hosts' worth of names; none running here, so about six
// series each): the cost docs/scale.md follows.
func BenchmarkMetrics20000VMs(b *testing.B) {
	m, _ := newTestManager(b)
	ctx := context.Background()
	cli := m.store.Client()
	const n = 20000
	for i := 0; i < n; i += 100 {
		var ops []clientv3.Op
		for j := i; j < i+100; j++ {
			r := record{Spec: hostproto.VMSpec{Name: fmt.Sprintf("vm%05d", j), MemoryBytes: 1 << 30, CPUs: 1, Pool: "p"},
				Host: fmt.Sprintf("h%04d", j/20), State: api.StateRunning, Desired: desiredRunning}
			v, _ := json.Marshal(r)
			ops = append(ops, clientv3.OpPut("/test/"+vmKey(r.Spec.Name), string(v)))
		}
		if _, err := cli.Txn(ctx).Then(ops...).Commit(); err != nil {
			b.Fatal(err)
		}
	}
	for rs, ok := m.cache.snapshot(); !ok || len(rs) < n; rs, ok = m.cache.snapshot() {
		time.Sleep(10 * time.Millisecond)
	}
	tok, err := m.CreateToken(ctx, api.TokenCreateRequest{Name: "scraper", Role: RoleViewer}, "test")
	if err != nil {
		b.Fatal(err)
	}
	h := m.Handler()
	b.ResetTimer()
	for b.Loop() {
		req := httptest.NewRequest("GET", "/metrics", nil)
		req.Header.Set("Authorization", "Bearer "+tok.Token)
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		if w.Code != 200 {
			b.Fatalf("metrics: %d", w.Code)
		}
		b.ReportMetric(float64(w.Body.Len()), "bytes/scrape")
	}
}
