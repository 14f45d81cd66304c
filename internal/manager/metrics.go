package manager

import (
	"compress/gzip"
	"context"
	"io"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/common/expfmt"

	"github.com/vigil-project/vigil/api"
)

// Metrics: GET /metrics on every manager, in Prometheus' text format,
// covers the whole cluster from one scrape target: every manager follows
// every host's heartbeats (with the statuses of its VMs) and reads the
// records from etcd, so any one of them can describe all of it. The
// series describing the cluster are made at scrape time from that view
// (collectCluster); what happens in this manager (API requests,
// operations it ran) is counted as it happens.

// metrics are the manager's own instruments and its registry.
type metrics struct {
	reg *prometheus.Registry
	// api is the API's request latency by route pattern, method and code.
	api *prometheus.HistogramVec
	// ops are VM operations' durations, and pause the guest's stops in
	// them, by action (suspend, snapshot, migrate, ...).
	ops   *prometheus.HistogramVec
	pause *prometheus.HistogramVec
}

func newMetrics(m *Manager) *metrics {
	mt := &metrics{reg: prometheus.NewRegistry()}
	mt.api = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name: "vigil_api_request_duration_seconds", Help: "API requests served by this manager, by route, method and status code.",
		Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 10, 60},
	}, []string{"route", "method", "code"})
	mt.ops = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name: "vigil_vm_operation_duration_seconds", Help: "VM operations this manager ran (suspend, resume, snapshot, revert, migrate, pause, ...), until done.",
		Buckets: []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 120},
	}, []string{"action"})
	mt.pause = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name: "vigil_vm_operation_pause_seconds", Help: "How long the guest's CPUs were stopped by a VM operation (live snapshot, migration downtime).",
		Buckets: []float64{.001, .0025, .005, .01, .02, .05, .1, .25, .5, 1, 5},
	}, []string{"action"})
	mt.reg.MustRegister(mt.api, mt.ops, mt.pause,
		// The process's own: CPU, memory, files; the Go runtime's, with
		// the garbage collector's share of the CPU and how long runnable
		// goroutines wait for a thread (go_sched_latencies_seconds: where
		// an API request's tail goes on a busy manager).
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		collectors.NewGoCollector(collectors.WithGoCollectorRuntimeMetrics(collectors.MetricsScheduler,
			collectors.GoRuntimeMetricsRule{Matcher: regexp.MustCompile(`^/cpu/classes/gc/`)})),
	)
	return mt
}

// observeOp records a finished operation's timings.
func (mt *metrics) observeOp(op *api.Operation) {
	if mt == nil || op == nil || op.DurationMS <= 0 {
		return
	}
	mt.ops.WithLabelValues(op.Action).Observe(op.DurationMS / 1000)
	if op.PausedMS > 0 {
		mt.pause.WithLabelValues(op.Action).Observe(op.PausedMS / 1000)
	}
}

// instrument times h as route in the API histogram.
func (mt *metrics) instrument(route string, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		sw := &statusWriter{ResponseWriter: w, code: http.StatusOK}
		t0 := time.Now()
		h.ServeHTTP(sw, r)
		mt.api.WithLabelValues(route, r.Method, strconv.Itoa(sw.code)).Observe(time.Since(t0).Seconds())
	})
}

// statusWriter remembers the status code written.
type statusWriter struct {
	http.ResponseWriter
	code int
}

func (w *statusWriter) WriteHeader(code int) {
	w.code = code
	w.ResponseWriter.WriteHeader(code)
}

// Flush passes a flush on (event streams).
func (w *statusWriter) Flush() {
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// Unwrap lets http.ResponseController reach the real writer (flushes for
// streams, hijacking for tunnels).
func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

func (m *Manager) handleMetrics(w http.ResponseWriter, r *http.Request) {
	// The manager's own instruments go through client_golang; the
	// cluster's series (every VM's and host's, made at scrape time) are
	// written directly (metricstext.go). Both in the text format, which
	// every Prometheus reads.
	fams, gatherErr := m.metrics.reg.Gather()
	var out io.Writer = w
	w.Header().Set("Content-Type", string(expfmt.NewFormat(expfmt.TypeTextPlain)))
	w.Header().Set("Vary", "Accept-Encoding")
	if gzipAccepted(r) {
		w.Header().Set("Content-Encoding", "gzip")
		zw, _ := gzip.NewWriterLevel(w, gzip.BestSpeed)
		defer zw.Close()
		out = zw
	}
	if gatherErr != nil {
		m.log.Warn("gather the manager's own metrics", "err", gatherErr)
	}
	enc := expfmt.NewEncoder(out, expfmt.NewFormat(expfmt.TypeTextPlain))
	for _, f := range fams {
		if err := enc.Encode(f); err != nil {
			return // the scraper went away
		}
	}
	var e exposition
	m.collectCluster(r.Context(), &e)
	e.WriteTo(out)
}

// gzipAccepted says whether the request takes a gzip-encoded answer (as
// Prometheus asks): at 20,000 VMs the text is 15 MB, gzip a tenth.
func gzipAccepted(r *http.Request) bool {
	for _, part := range strings.Split(r.Header.Get("Accept-Encoding"), ",") {
		params := strings.Split(part, ";")
		if enc := strings.TrimSpace(params[0]); !strings.EqualFold(enc, "gzip") && enc != "*" {
			continue
		}
		for _, p := range params[1:] {
			if v, ok := strings.CutPrefix(strings.TrimSpace(p), "q="); ok {
				q, err := strconv.ParseFloat(v, 64)
				return err == nil && q > 0
			}
		}
		return true
	}
	return false
}

var (
	vmLabels   = []string{"vm", "host"}
	hostLabels = []string{"host"}

	famVMInfo       = &family{name: "vigil_vm_info", typ: "gauge", help: "A VM: 1, with its state, storage pool and image as labels.", labels: []string{"vm", "host", "state", "pool", "image"}}
	famVMRunning    = &family{name: "vigil_vm_running", typ: "gauge", help: "1 if the VM's QEMU runs on its host.", labels: vmLabels}
	famVMMemory     = &family{name: "vigil_vm_memory_bytes", typ: "gauge", help: "The VM's memory.", labels: vmLabels}
	famVMVCPUs      = &family{name: "vigil_vm_vcpus", typ: "gauge", help: "The VM's virtual CPUs.", labels: vmLabels}
	famVMCPU        = &family{name: "vigil_vm_cpu_seconds_total", typ: "counter", help: "CPU time of the VM's vCPUs since its QEMU started.", labels: vmLabels}
	famVMDiskBytes  = &family{name: "vigil_vm_disk_bytes_total", typ: "counter", help: "Bytes the VM's disks read and wrote since its QEMU started.", labels: []string{"vm", "host", "direction"}}
	famVMDiskOps    = &family{name: "vigil_vm_disk_operations_total", typ: "counter", help: "Read and write requests of the VM's disks since its QEMU started.", labels: []string{"vm", "host", "direction"}}
	famVMNetBytes   = &family{name: "vigil_vm_network_bytes_total", typ: "counter", help: "Bytes the VM's network cards received and sent (bridged networks).", labels: []string{"vm", "host", "direction"}}
	famVMNetPackets = &family{name: "vigil_vm_network_packets_total", typ: "counter", help: "Packets the VM's network cards received and sent (bridged networks).", labels: []string{"vm", "host", "direction"}}
	famVMHeartbeat  = &family{name: "vigil_vm_heartbeat_age_seconds", typ: "gauge", help: "Time since the guest agent's last heartbeat.", labels: vmLabels}
	famVMRestarts   = &family{name: "vigil_vm_recent_restarts", typ: "gauge", help: "Automatic restarts within the VM's restart window.", labels: vmLabels}
	famVMProtection = &family{name: "vigil_vm_protection_info", typ: "gauge", help: "A protected VM: 1, with its protection state and secondary host.", labels: []string{"vm", "host", "state", "secondary"}}
	famVMRPO        = &family{name: "vigil_vm_protection_rpo_seconds", typ: "gauge", help: "Guest time a failover of the protected VM would lose now.", labels: vmLabels}
	famVMCkptPause  = &family{name: "vigil_vm_checkpoint_pause_seconds", typ: "gauge", help: "The guest's stop per checkpoint over recent checkpoints.", labels: []string{"vm", "host", "quantile"}}
	famVMCkptBytes  = &family{name: "vigil_vm_checkpoint_bytes", typ: "gauge", help: "Size of the protected VM's last checkpoint.", labels: vmLabels}
	famVMCkpts      = &family{name: "vigil_vm_checkpoints_total", typ: "counter", help: "Checkpoints committed on the secondary in the current pairing.", labels: vmLabels}

	famHostUp        = &family{name: "vigil_host_up", typ: "gauge", help: "1 if the host is up (heartbeating), 0 if down or dead.", labels: hostLabels}
	famHostDead      = &family{name: "vigil_host_dead", typ: "gauge", help: "1 if the host was declared dead.", labels: hostLabels}
	famHostMemory    = &family{name: "vigil_host_memory_bytes", typ: "gauge", help: "The host's memory for VMs.", labels: hostLabels}
	famHostReserved  = &family{name: "vigil_host_memory_reserved_bytes", typ: "gauge", help: "Memory reserved on the host: its VMs' and the standbys it keeps.", labels: hostLabels}
	famHostCPUs      = &family{name: "vigil_host_cpus", typ: "gauge", help: "The host's CPUs.", labels: hostLabels}
	famHostVMs       = &family{name: "vigil_host_vms", typ: "gauge", help: "VMs the host reports.", labels: hostLabels}
	famHostHeartbeat = &family{name: "vigil_host_heartbeat_age_seconds", typ: "gauge", help: "Time since this manager last heard from the host.", labels: hostLabels}

	famLeader     = &family{name: "vigil_manager_leader", typ: "gauge", help: "1 if this manager leads (runs the controllers).", labels: []string{"manager"}}
	famQueueDepth = &family{name: "vigil_workqueue_depth", typ: "gauge", help: "VMs waiting on this manager's work queue."}
	famQueueDone  = &family{name: "vigil_workqueue_processed_total", typ: "counter", help: "Work items this manager's queue processed."}
	famQueueFail  = &family{name: "vigil_workqueue_failed_total", typ: "counter", help: "Work items that failed."}
	famQueueLat   = &family{name: "vigil_workqueue_latency_seconds_total", typ: "counter", help: "Summed time work items waited in the queue (divide by vigil_workqueue_processed_total)."}
	famEtcdSize   = &family{name: "vigil_etcd_db_size_bytes", typ: "gauge", help: "Size of the etcd database, per member.", labels: []string{"member"}}
	famScrapeErr  = &family{name: "vigil_scrape_error", typ: "gauge", help: "1 if part of the cluster's state could not be read for this scrape.", labels: []string{"what"}}
)

// collectCluster describes the cluster as this manager sees it, now.
func (m *Manager) collectCluster(ctx context.Context, e *exposition) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	gauge, counter := e.add, e.add
	b := func(ok bool) float64 {
		if ok {
			return 1
		}
		return 0
	}
	gauge(famLeader, b(m.leader.Load()), m.name)
	st := m.queue.Stats()
	gauge(famQueueDepth, float64(m.queue.Len()))
	counter(famQueueDone, float64(st.Processed))
	counter(famQueueFail, float64(st.Failed))
	counter(famQueueLat, st.QueueLatencySum.Seconds())
	if cli := m.store.Client(); cli != nil {
		for _, ep := range cli.Endpoints() {
			sctx, cancel := context.WithTimeout(ctx, time.Second)
			if s, err := cli.Status(sctx, ep); err == nil {
				gauge(famEtcdSize, float64(s.DbSize), ep)
			}
			cancel()
		}
	}

	// Stale: the store did not answer, and the VMs are the mirror's.
	rs, stale, err := m.currentRecords(ctx)
	gauge(famScrapeErr, b(err != nil || stale), "vms")
	now := time.Now()
	for _, he := range m.hosts.entries() {
		v := he.view()
		gauge(famHostUp, b(v.State == "up"), v.Name)
		gauge(famHostDead, b(v.State == "dead"), v.Name)
		gauge(famHostMemory, float64(v.MemoryBytes), v.Name)
		gauge(famHostCPUs, float64(v.CPUs), v.Name)
		gauge(famHostVMs, float64(v.VMs), v.Name)
		gauge(famHostHeartbeat, now.Sub(he.h.HeardAt()).Seconds(), v.Name)
	}
	if err != nil {
		return
	}
	m.placeMu.Lock()
	cands := m.hosts.candidates(rs, m.moving)
	m.placeMu.Unlock()
	for _, cd := range cands {
		gauge(famHostReserved, float64(cd.usedMemory), cd.host.Name)
	}
	for _, s := range rs {
		r := s.rec
		name, host := r.Spec.Name, r.Host
		image := "built-in"
		if r.Spec.Image != nil {
			image = r.Spec.Image.Name
		} else if r.Spec.ISO != nil {
			image = r.Spec.ISO.Name
		}
		gauge(famVMInfo, 1, name, host, string(r.State), r.Spec.Pool, image)
		act := m.actual(r)
		gauge(famVMRunning, b(act.Running), name, host)
		gauge(famVMMemory, float64(r.Spec.MemoryBytes), name, host)
		gauge(famVMVCPUs, float64(r.Spec.CPUs), name, host)
		gauge(famVMRestarts, float64(len(r.Restarts)), name, host)
		if act.Guest != nil && !act.Guest.LastHeartbeat.IsZero() {
			gauge(famVMHeartbeat, now.Sub(act.Guest.LastHeartbeat).Seconds(), name, host)
		}
		if u := act.Usage; u != nil && act.Running {
			counter(famVMCPU, u.CPUSeconds, name, host)
			counter(famVMDiskBytes, float64(u.DiskReadBytes), name, host, "read")
			counter(famVMDiskBytes, float64(u.DiskWriteBytes), name, host, "write")
			counter(famVMDiskOps, float64(u.DiskReadOps), name, host, "read")
			counter(famVMDiskOps, float64(u.DiskWriteOps), name, host, "write")
			if len(r.Spec.NICs) > 0 {
				counter(famVMNetBytes, float64(u.NetRxBytes), name, host, "rx")
				counter(famVMNetBytes, float64(u.NetTxBytes), name, host, "tx")
				counter(famVMNetPackets, float64(u.NetRxPackets), name, host, "rx")
				counter(famVMNetPackets, float64(u.NetTxPackets), name, host, "tx")
			}
		}
		if p := m.protectionView(r, act); p != nil {
			gauge(famVMProtection, 1, name, host, p.State, p.SecondaryHost)
			if p.RPOMS > 0 {
				gauge(famVMRPO, p.RPOMS/1000, name, host)
			}
			if p.Checkpoints > 0 {
				gauge(famVMCkptPause, p.PauseP50MS/1000, name, host, "0.5")
				gauge(famVMCkptPause, p.PauseP99MS/1000, name, host, "0.99")
				gauge(famVMCkptBytes, float64(p.BytesPerCheckpoint), name, host)
				counter(famVMCkpts, float64(p.Checkpoints), name, host)
			}
		}
	}
}
