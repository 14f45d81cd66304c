package manager

import (
	"context"
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/vigil-project/vigil/api"
)

// Metrics: GET /metrics on every manager, in Prometheus' text format,
// covers the whole cluster from one scrape target: every manager follows
// every host's heartbeats (with the statuses of its VMs) and reads the
// records from etcd, so any one of them can describe all of it. Gauges
// describing the cluster are made at scrape time from that view (a
// Collector); what happens in this manager (API requests, operations it
// ran) is counted as it happens.

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
	mt.reg.MustRegister(mt.api, mt.ops, mt.pause, clusterCollector{m})
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
	promhttp.HandlerFor(m.metrics.reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError}).ServeHTTP(w, r)
}

// clusterCollector describes the cluster as this manager sees it, at
// scrape time.
type clusterCollector struct{ m *Manager }

var (
	vmLabels   = []string{"vm", "host"}
	hostLabels = []string{"host"}

	descVMInfo       = prometheus.NewDesc("vigil_vm_info", "A VM: 1, with its state, storage pool and image as labels.", []string{"vm", "host", "state", "pool", "image"}, nil)
	descVMRunning    = prometheus.NewDesc("vigil_vm_running", "1 if the VM's QEMU runs on its host.", vmLabels, nil)
	descVMMemory     = prometheus.NewDesc("vigil_vm_memory_bytes", "The VM's memory.", vmLabels, nil)
	descVMVCPUs      = prometheus.NewDesc("vigil_vm_vcpus", "The VM's virtual CPUs.", vmLabels, nil)
	descVMCPU        = prometheus.NewDesc("vigil_vm_cpu_seconds_total", "CPU time of the VM's vCPUs since its QEMU started.", vmLabels, nil)
	descVMDiskBytes  = prometheus.NewDesc("vigil_vm_disk_bytes_total", "Bytes the VM's disks read and wrote since its QEMU started.", []string{"vm", "host", "direction"}, nil)
	descVMDiskOps    = prometheus.NewDesc("vigil_vm_disk_operations_total", "Read and write requests of the VM's disks since its QEMU started.", []string{"vm", "host", "direction"}, nil)
	descVMNetBytes   = prometheus.NewDesc("vigil_vm_network_bytes_total", "Bytes the VM's network cards received and sent (bridged networks).", []string{"vm", "host", "direction"}, nil)
	descVMNetPackets = prometheus.NewDesc("vigil_vm_network_packets_total", "Packets the VM's network cards received and sent (bridged networks).", []string{"vm", "host", "direction"}, nil)
	descVMHeartbeat  = prometheus.NewDesc("vigil_vm_heartbeat_age_seconds", "Time since the guest agent's last heartbeat.", vmLabels, nil)
	descVMRestarts   = prometheus.NewDesc("vigil_vm_recent_restarts", "Automatic restarts within the VM's restart window.", vmLabels, nil)
	descVMProtection = prometheus.NewDesc("vigil_vm_protection_info", "A protected VM: 1, with its protection state and secondary host.", []string{"vm", "host", "state", "secondary"}, nil)
	descVMRPO        = prometheus.NewDesc("vigil_vm_protection_rpo_seconds", "Guest time a failover of the protected VM would lose now.", vmLabels, nil)
	descVMCkptPause  = prometheus.NewDesc("vigil_vm_checkpoint_pause_seconds", "The guest's stop per checkpoint over recent checkpoints.", []string{"vm", "host", "quantile"}, nil)
	descVMCkptBytes  = prometheus.NewDesc("vigil_vm_checkpoint_bytes", "Size of the protected VM's last checkpoint.", vmLabels, nil)
	descVMCkpts      = prometheus.NewDesc("vigil_vm_checkpoints_total", "Checkpoints committed on the secondary in the current pairing.", vmLabels, nil)

	descHostUp        = prometheus.NewDesc("vigil_host_up", "1 if the host is up (heartbeating), 0 if down or dead.", hostLabels, nil)
	descHostDead      = prometheus.NewDesc("vigil_host_dead", "1 if the host was declared dead.", hostLabels, nil)
	descHostMemory    = prometheus.NewDesc("vigil_host_memory_bytes", "The host's memory for VMs.", hostLabels, nil)
	descHostReserved  = prometheus.NewDesc("vigil_host_memory_reserved_bytes", "Memory reserved on the host: its VMs' and the standbys it keeps.", hostLabels, nil)
	descHostCPUs      = prometheus.NewDesc("vigil_host_cpus", "The host's CPUs.", hostLabels, nil)
	descHostVMs       = prometheus.NewDesc("vigil_host_vms", "VMs the host reports.", hostLabels, nil)
	descHostHeartbeat = prometheus.NewDesc("vigil_host_heartbeat_age_seconds", "Time since this manager last heard from the host.", hostLabels, nil)

	descLeader     = prometheus.NewDesc("vigil_manager_leader", "1 if this manager leads (runs the controllers).", []string{"manager"}, nil)
	descQueueDepth = prometheus.NewDesc("vigil_workqueue_depth", "VMs waiting on this manager's work queue.", nil, nil)
	descQueueDone  = prometheus.NewDesc("vigil_workqueue_processed_total", "Work items this manager's queue processed.", nil, nil)
	descQueueFail  = prometheus.NewDesc("vigil_workqueue_failed_total", "Work items that failed.", nil, nil)
	descQueueLat   = prometheus.NewDesc("vigil_workqueue_latency_seconds_total", "Summed time work items waited in the queue (divide by vigil_workqueue_processed_total).", nil, nil)
	descEtcdSize   = prometheus.NewDesc("vigil_etcd_db_size_bytes", "Size of the etcd database, per member.", []string{"member"}, nil)
	descScrapeErr  = prometheus.NewDesc("vigil_scrape_error", "1 if part of the cluster's state could not be read for this scrape.", []string{"what"}, nil)
)

// Describe sends nothing: the collector is unchecked (its series come and
// go with VMs and hosts).
func (clusterCollector) Describe(chan<- *prometheus.Desc) {}

func (c clusterCollector) Collect(ch chan<- prometheus.Metric) {
	m := c.m
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, labels...)
	}
	b := func(ok bool) float64 {
		if ok {
			return 1
		}
		return 0
	}
	gauge(descLeader, b(m.leader.Load()), m.name)
	st := m.queue.Stats()
	gauge(descQueueDepth, float64(m.queue.Len()))
	counter(descQueueDone, float64(st.Processed))
	counter(descQueueFail, float64(st.Failed))
	counter(descQueueLat, st.QueueLatencySum.Seconds())
	if cli := m.store.Client(); cli != nil {
		for _, ep := range cli.Endpoints() {
			sctx, cancel := context.WithTimeout(ctx, time.Second)
			if s, err := cli.Status(sctx, ep); err == nil {
				gauge(descEtcdSize, float64(s.DbSize), ep)
			}
			cancel()
		}
	}

	rs, err := m.cachedRecords(ctx)
	gauge(descScrapeErr, b(err != nil), "vms")
	now := time.Now()
	for _, e := range m.hosts.entries() {
		v := e.view()
		gauge(descHostUp, b(v.State == "up"), v.Name)
		gauge(descHostDead, b(v.State == "dead"), v.Name)
		gauge(descHostMemory, float64(v.MemoryBytes), v.Name)
		gauge(descHostCPUs, float64(v.CPUs), v.Name)
		gauge(descHostVMs, float64(v.VMs), v.Name)
		gauge(descHostHeartbeat, now.Sub(e.h.HeardAt()).Seconds(), v.Name)
	}
	if err != nil {
		return
	}
	m.placeMu.Lock()
	cands := m.hosts.candidates(rs, m.moving)
	m.placeMu.Unlock()
	for _, cd := range cands {
		gauge(descHostReserved, float64(cd.usedMemory), cd.host.Name)
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
		gauge(descVMInfo, 1, name, host, string(r.State), r.Spec.Pool, image)
		act := m.actual(r)
		gauge(descVMRunning, b(act.Running), name, host)
		gauge(descVMMemory, float64(r.Spec.MemoryBytes), name, host)
		gauge(descVMVCPUs, float64(r.Spec.CPUs), name, host)
		gauge(descVMRestarts, float64(len(r.Restarts)), name, host)
		if act.Guest != nil && !act.Guest.LastHeartbeat.IsZero() {
			gauge(descVMHeartbeat, now.Sub(act.Guest.LastHeartbeat).Seconds(), name, host)
		}
		if u := act.Usage; u != nil && act.Running {
			counter(descVMCPU, u.CPUSeconds, name, host)
			counter(descVMDiskBytes, float64(u.DiskReadBytes), name, host, "read")
			counter(descVMDiskBytes, float64(u.DiskWriteBytes), name, host, "write")
			counter(descVMDiskOps, float64(u.DiskReadOps), name, host, "read")
			counter(descVMDiskOps, float64(u.DiskWriteOps), name, host, "write")
			if len(r.Spec.NICs) > 0 {
				counter(descVMNetBytes, float64(u.NetRxBytes), name, host, "rx")
				counter(descVMNetBytes, float64(u.NetTxBytes), name, host, "tx")
				counter(descVMNetPackets, float64(u.NetRxPackets), name, host, "rx")
				counter(descVMNetPackets, float64(u.NetTxPackets), name, host, "tx")
			}
		}
		if p := m.protectionView(r, act); p != nil {
			gauge(descVMProtection, 1, name, host, p.State, p.SecondaryHost)
			if p.RPOMS > 0 {
				gauge(descVMRPO, p.RPOMS/1000, name, host)
			}
			if p.Checkpoints > 0 {
				gauge(descVMCkptPause, p.PauseP50MS/1000, name, host, "0.5")
				gauge(descVMCkptPause, p.PauseP99MS/1000, name, host, "0.99")
				gauge(descVMCkptBytes, float64(p.BytesPerCheckpoint), name, host)
				counter(descVMCkpts, float64(p.Checkpoints), name, host)
			}
		}
	}
}
