package main

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/hostproto"
	"github.com/vigil-project/vigil/internal/pki"
)

// soak runs a real manager (its own process, embedded etcd) and n
// simulated hosts that joined it for real (a join token, a certificate
// request) and heartbeat every second over mutual TLS, each reporting vms
// VMs, for d. It reports the etcd database's size at the end (with
// compaction and defragmentation as they run), the size history would
// have reached without compaction, the write rate, and the heartbeat
// latency.
func (b *bench) soak(ctx context.Context, n, vms int, d time.Duration) ([]row, error) {
	dir := filepath.Join(b.tmp, "soak")
	addr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	bin := filepath.Join(os.Getenv("VIGIL_BIN"), "vigil")
	cmd := exec.CommandContext(ctx, bin, "agent", "--manager", "--listen", addr, "--data-dir", dir)
	var logBuf bytes.Buffer
	cmd.Stdout, cmd.Stderr = &logBuf, &logBuf
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	defer func() { cmd.Process.Signal(syscall.SIGKILL); cmd.Wait() }()
	c := clientFor(dir)
	var tok api.JoinToken
	for t0 := time.Now(); ; time.Sleep(100 * time.Millisecond) {
		c = clientFor(dir)
		if tok, err = c.JoinToken(ctx, ""); err == nil {
			break
		}
		if time.Since(t0) > time.Minute {
			return nil, fmt.Errorf("manager not up: %v\n%s", err, logBuf.String())
		}
	}
	url := "https://" + addr

	// Join the simulated hosts.
	type simHost struct {
		name string
		hc   *http.Client
	}
	var hosts []simHost
	for i := 0; i < n; i++ {
		if i > 0 {
			if tok, err = c.JoinToken(ctx, ""); err != nil {
				return nil, err
			}
		}
		h, err := joinSim(ctx, url, tok.Token, fmt.Sprintf("sim%03d", i))
		if err != nil {
			return nil, err
		}
		hosts = append(hosts, simHost{fmt.Sprintf("sim%03d", i), h})
	}
	cli, err := etcdClientOf(filepath.Join(dir, "etcd"))
	if err != nil {
		return nil, err
	}
	defer cli.Close()
	startSize, startRev := dbStatus(ctx, cli)

	// Heartbeat: each host every second, its status of vms VMs.
	var writes, failures atomic.Int64
	var bytesSent atomic.Int64
	var latMu sync.Mutex
	var lat []time.Duration
	sctx, stop := context.WithTimeout(ctx, d)
	defer stop()
	var wg sync.WaitGroup
	var maxSize atomic.Int64
	wg.Add(1)
	go func() {
		defer wg.Done()
		for sctx.Err() == nil {
			if s, _ := dbStatus(sctx, cli); s > maxSize.Load() {
				maxSize.Store(s)
			}
			select {
			case <-sctx.Done():
			case <-time.After(5 * time.Second):
			}
		}
	}()
	for i, h := range hosts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Spread the hosts over the second, as real ones are.
			time.Sleep(time.Duration(i) * time.Second / time.Duration(len(hosts)))
			hb := simHeartbeat(h.name, vms)
			body, _ := json.Marshal(hb)
			t := time.NewTicker(time.Second)
			defer t.Stop()
			for {
				t0 := time.Now()
				resp, err := h.hc.Post(url+"/v1/hosts/"+h.name+"/heartbeat", "application/json", bytes.NewReader(body))
				if err == nil {
					resp.Body.Close()
				}
				if err != nil || resp.StatusCode != http.StatusNoContent {
					failures.Add(1)
				} else {
					writes.Add(1)
					bytesSent.Add(int64(len(body)))
					latMu.Lock()
					lat = append(lat, time.Since(t0))
					latMu.Unlock()
				}
				select {
				case <-sctx.Done():
					return
				case <-t.C:
				}
			}
		}()
	}
	wg.Wait()
	endSize, endRev := dbStatus(ctx, cli)
	if s := endSize; s > maxSize.Load() {
		maxSize.Store(s)
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	w := writes.Load()
	// Without compaction every heartbeat's status stays in history: at
	// least the bytes written (bbolt adds its own overhead on top).
	uncompacted := startSize + bytesSent.Load()
	mib := func(b int64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }
	return []row{
		{what: fmt.Sprintf("etcd database after %s of %d simulated hosts (joined for real, %d VMs each) heartbeating every second over mutual TLS", d, n, vms),
			vigil: mib(endSize), baseline: "≥ " + mib(uncompacted) + " (the same writes kept without compaction: their bytes alone)",
			ratio: fmt.Sprintf("%.3f", float64(endSize)/float64(uncompacted)),
			note: fmt.Sprintf("largest seen %s; %d heartbeats stored (%.0f/s), %d failed; revisions %d → %d; heartbeat answered p50 %s, p99 %s; auto-compaction keeps 10000 revisions, the maintenance loop compacts and defragments",
				mib(maxSize.Load()), w, float64(w)/d.Seconds(), failures.Load(), startRev, endRev, ms1(p(lat, 50)), ms1(p(lat, 99)))},
	}, nil
}

// joinSim joins a simulated host and returns its mutual-TLS client.
func joinSim(ctx context.Context, url, token, name string) (*http.Client, error) {
	t, err := pki.ParseJoinToken(token)
	if err != nil {
		return nil, err
	}
	key, keyPEM, _ := pki.NewKey()
	csr, _ := pki.NewCSR(key, name)
	pinned := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: pki.PinnedConfig(t.CAFingerprint, nil)}}
	body, _ := json.Marshal(hostproto.Join{Name: name, Token: token, CSR: string(csr),
		Register: hostproto.Register{Addr: "127.0.0.1:9", FenceAfterMS: 5000, Info: api.Host{Name: name, CPUs: 8, MemoryBytes: 64 << 30}}})
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, url+"/v1/hosts/join", bytes.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	resp, err := pinned.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var joined hostproto.Joined
	if resp.StatusCode != http.StatusOK || json.NewDecoder(resp.Body).Decode(&joined) != nil {
		return nil, fmt.Errorf("join %s: %s", name, resp.Status)
	}
	h := &pki.Holder{}
	if err := h.Set([]byte(joined.Cert), keyPEM, []byte(joined.CA)); err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM([]byte(joined.CA))
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: pki.ClientConfig(pool, h, ""), MaxIdleConnsPerHost: 2}}, nil
}

// simHeartbeat is what a host with vms running VMs reports.
func simHeartbeat(name string, vms int) hostproto.Heartbeat {
	hb := hostproto.Heartbeat{Info: api.Host{Name: name, State: "up", Accel: "kvm", CPUs: 32, MemoryBytes: 256 << 30, VMs: vms,
		QEMUVersion: "7.2.22", LastHeartbeat: time.Now().UTC(), StoragePool: "pool-0123456789abcdef"}}
	for i := 0; i < vms; i++ {
		hb.Statuses = append(hb.Statuses, hostproto.VMStatus{Name: fmt.Sprintf("%s-vm%02d", name, i), Running: true, PID: 10000 + i,
			RunState: "running", StartedAt: time.Now().UTC(),
			Guest: &api.GuestInfo{BootID: "0b9cf7a2-3c1d-4e5f-8a9b-" + strings.Repeat("0", 12), Seq: 12345, UptimeSeconds: 3600,
				Load1: 0.5, MemUsedBytes: 200 << 20, LastHeartbeat: time.Now().UTC()}})
	}
	return hb
}

// etcdClientOf connects to the embedded etcd whose data dir is dir, on its
// client socket.
func etcdClientOf(dir string) (*clientv3.Client, error) {
	abs, err := filepath.Abs(filepath.Join(dir, "client.sock"))
	if err != nil {
		return nil, err
	}
	return clientv3.New(clientv3.Config{Endpoints: []string{"unix://" + abs}, DialTimeout: 5 * time.Second})
}

func dbStatus(ctx context.Context, cli *clientv3.Client) (int64, int64) {
	sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	st, err := cli.Status(sctx, cli.Endpoints()[0])
	if err != nil {
		return 0, 0
	}
	return st.DbSize, st.Header.Revision
}
