package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/client"
	"github.com/vigil-project/vigil/internal/qemu"
	"github.com/vigil-project/vigil/internal/testenv"
)

// protectMem is the guest size the issue asks the checkpoint figures for.
const protectMem = 512 << 20

// counterScript is the counter service the guest runs (testenv).
const counterScript = testenv.CounterService

// Guest workloads: a CPU-bound loop and a memory writer, each printing how
// long it took in ms; dirtier rewrites 64 MiB of guest memory over and over.
const (
	// (The guest's busybox date has no %N: /proc/uptime counts in 10 ms.)
	cpuLoad = `s=$(cat /proc/uptime); i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done; echo "$s $(cat /proc/uptime)" | awk '{print int(($3-$1)*1000)}'`
	memLoad = `s=$(cat /proc/uptime); dd if=/dev/zero of=/tmp/w bs=1M count=64 2>/dev/null; rm /tmp/w; echo "$s $(cat /proc/uptime)" | awk '{print int(($3-$1)*1000)}'`
	dirtier = `while [ ! -e /tmp/stop-dirty ]; do dd if=/dev/urandom of=/tmp/d bs=1M count=64 2>/dev/null; done; rm -f /tmp/d /tmp/stop-dirty`
)

// protect measures synchronized state on a 512 MiB guest: the guest's
// pause per checkpoint (idle and while it dirties memory, at two
// intervals) against the same checkpoint done by hand on bare QEMU to a
// local file; the cost to a CPU-bound and a memory-writing workload and to
// the latency of a service in the guest, protected against not; the bytes
// sent; and, over several failovers, the detection time, the time from the
// host's declared death to the service answering from the secondary, and
// the time to a new secondary.
func (b *bench) protect(ctx context.Context) ([]row, error) {
	cl, err := startCluster(ctx, filepath.Join(b.tmp, "prot"), timing{}, "h1", "h2", "h3")
	if err != nil {
		return nil, err
	}
	defer cl.stop()
	fail := func(err error) ([]row, error) { return nil, fmt.Errorf("%w%s", err, cl.logTails(30)) }
	c := cl.c
	const name = "prot"
	if _, err := c.CreateVM(ctx, api.VMCreateRequest{Name: name, MemoryBytes: protectMem, CPUs: 1, DiskBytes: 256 << 20, Start: true, Host: "h1"}); err != nil {
		return fail(err)
	}
	v, err := c.WaitGuest(ctx, name)
	if err != nil {
		return fail(err)
	}
	if _, err := guestOut(ctx, c, name, counterScript); err != nil {
		return fail(err)
	}
	url := "http://" + v.Endpoint + "/cgi-bin/n"

	// Unprotected first: the workloads' and the service's own figures.
	runs := max(b.runs, 10)
	cpuOff, memOff, latOff, err := protectWorkloads(ctx, c, name, url, runs)
	if err != nil {
		return fail(err)
	}
	var rows []row
	type phase struct {
		interval time.Duration
		dirty    bool
	}
	var pauses = map[phase][2]time.Duration{}
	for _, iv := range []time.Duration{300 * time.Millisecond, time.Second} {
		for _, dirty := range []bool{false, true} {
			if dirty {
				if _, err := c.Exec(ctx, name, api.ExecRequest{Command: dirtier, Background: true}); err != nil {
					return fail(err)
				}
			}
			// Paired afresh: the figures below are this phase's only.
			c.Unprotect(ctx, name)
			if _, err := c.Protect(ctx, name, api.ProtectRequest{SecondaryHost: "h2", IntervalMS: iv.Milliseconds()}); err != nil {
				return fail(err)
			}
			p, err := waitCheckpoints(ctx, c, name, iv, int64(runs)+2)
			if err != nil {
				return fail(err)
			}
			load := "idle"
			if dirty {
				load = "rewriting 64 MiB of its memory in a loop"
			}
			pauses[phase{iv, dirty}] = [2]time.Duration{msDur(p.PauseP50MS), msDur(p.PauseP99MS)}
			per := max(float64(iv.Milliseconds()), p.CheckpointMS)
			rows = append(rows, row{
				what:     fmt.Sprintf("Protected 512 MiB guest, %s, every %s: guest pause per checkpoint (%d checkpoints)", load, iv, p.Checkpoints),
				vigil:    fmt.Sprintf("p50 %.1f ms, p99 %.1f ms", p.PauseP50MS, p.PauseP99MS),
				baseline: "QEMU COLO upstream: p99 78 ms under load (published)", ratio: "-",
				note: fmt.Sprintf("target p99 ≤ 20 ms; a checkpoint is %.1f MB and takes %.0f ms to commit: %.1f MB/s to the secondary",
					float64(p.BytesPerCheckpoint)/1e6, p.CheckpointMS, float64(p.BytesPerCheckpoint)/1e6/(per/1000))})
			if !dirty {
				cpuOn, memOn, latOn, err := protectWorkloads(ctx, c, name, url, runs)
				if err != nil {
					return fail(err)
				}
				how := "the same guest unprotected"
				rows = append(rows,
					versus(fmt.Sprintf("Protected every %s: CPU-bound loop in the guest (%d runs)", iv, runs), cpuOn, cpuOff, ms, how, ""),
					versus(fmt.Sprintf("Protected every %s: writing 64 MiB in the guest's memory (%d runs)", iv, runs), memOn, memOff, ms, how, ""),
					versus(fmt.Sprintf("Protected every %s: request to a service in the guest, until the answer (%d runs)", iv, runs), latOn, latOff, ms, how,
						"the answer waits for the checkpoint holding the state that made it"))
			} else {
				if _, err := c.Exec(ctx, name, api.ExecRequest{Command: "touch /tmp/stop-dirty; while [ -e /tmp/stop-dirty ]; do sleep 0.1; done"}); err != nil {
					return fail(err)
				}
			}
		}
	}
	bare, err := b.bareCheckpoints(ctx, runs)
	if err != nil {
		return fail(err)
	}
	idle := pauses[phase{300 * time.Millisecond, false}]
	rows = append(rows, row{what: fmt.Sprintf("Checkpoint pause, idle 512 MiB guest, Vigil against by hand (%d runs)", runs),
		vigil:    fmt.Sprintf("p50 %.1f ms, p99 %.1f ms", float64(idle[0])/1e6, float64(idle[1])/1e6),
		baseline: pctWith(bare, ms1) + " (bare QEMU by hand: the same live save with pause-before-switchover and the disk snapshot at the switchover, its stream discarded: no disk, no network)",
		ratio:    ratio(float64(idle[0]), float64(p(bare, 50))), note: "p50 ratio; Vigil also holds the guest's output and sends over TLS to another host"})

	// Failovers: each kills the VM's host; the VM continues on its
	// secondary, a new secondary is made on the third host, and the dead
	// host comes back for the next round.
	c.Unprotect(ctx, name)
	if _, err := c.Protect(ctx, name, api.ProtectRequest{IntervalMS: 300}); err != nil {
		return fail(err)
	}
	var detect, serve, reprotect []time.Duration
	failovers := max(b.runs/2, 3)
	for i := 0; i < failovers; i++ {
		if _, err := waitCheckpoints(ctx, c, name, 300*time.Millisecond, 3); err != nil {
			return fail(err)
		}
		v, err := c.VM(ctx, name)
		if err != nil {
			return fail(err)
		}
		from, boot := v.Host, v.Guest.BootID
		t0 := time.Now()
		if err := cl.killHost(from); err != nil {
			return fail(err)
		}
		dead, err := waitHostState(ctx, c, from, "dead", 60*time.Second)
		if err != nil {
			return fail(err)
		}
		answered, err := waitAnswer(ctx, url, v.Endpoint, boot, 60*time.Second)
		if err != nil {
			return fail(fmt.Errorf("failover %d: %w", i+1, err))
		}
		detect = append(detect, dead.Sub(t0))
		serve = append(serve, answered.Sub(dead))
		if _, err := waitProtected(ctx, c, name, 2*time.Minute); err != nil {
			return fail(fmt.Errorf("re-protection after failover %d: %w", i+1, err))
		}
		reprotect = append(reprotect, time.Since(answered))
		if err := cl.restartHost(ctx, from); err != nil {
			return fail(err)
		}
		if _, err := waitHostState(ctx, c, from, "up", time.Minute); err != nil {
			return fail(err)
		}
		// The counter server was in the guest's memory and disk: it
		// answers on the new host, same endpoint port.
		v, _ = c.VM(ctx, name)
		if v.Guest == nil || v.Guest.BootID != boot {
			return fail(fmt.Errorf("failover %d: the guest rebooted: %+v", i+1, v.Guest))
		}
	}
	rows = append(rows,
		row{what: fmt.Sprintf("Protected VM's host killed: detection, kill to declared dead (%d failovers)", failovers), vigil: pctWith(detect, ms),
			baseline: "-", ratio: "-", note: "the fencing rules: the dead host kills its VMs before the managers act"},
		row{what: fmt.Sprintf("Protected VM's host killed: declared dead to the service answering from the secondary (%d failovers)", failovers), vigil: pctWith(serve, ms),
			baseline: "-", ratio: "-", note: "target ≤ 2 s; same boot, counter carried on; vSphere FT: transparent, capped at 8 vCPUs"},
		row{what: fmt.Sprintf("Re-protection: service answering on the new primary to a new secondary protected (%d runs)", failovers), vigil: pctWith(reprotect, ms),
			baseline: "-", ratio: "-", note: "a standby on the third host, without stopping the guest"})
	return rows, nil
}

// guestOut runs a command in the guest and returns its output.
func guestOut(ctx context.Context, c *client.Client, vm, cmd string) (string, error) {
	r, err := c.Exec(ctx, vm, api.ExecRequest{Command: cmd, TimeoutSeconds: 120})
	if err != nil {
		return "", err
	}
	if r.ExitCode != 0 {
		return "", fmt.Errorf("in the guest: %q exited %d: %s %s", cmd, r.ExitCode, r.Output, r.Error)
	}
	return strings.TrimSpace(r.Output), nil
}

// protectWorkloads times runs of the CPU and memory loads (as the guest
// measures them) and of requests to the counter service.
func protectWorkloads(ctx context.Context, c *client.Client, vm, url string, runs int) (cpu, mem, lat []time.Duration, err error) {
	guestMS := func(cmd string) (time.Duration, error) {
		out, err := guestOut(ctx, c, vm, cmd)
		if err != nil {
			return 0, err
		}
		n, err := strconv.Atoi(out)
		if err != nil {
			return 0, fmt.Errorf("guest timing %q: %w", out, err)
		}
		return time.Duration(n) * time.Millisecond, nil
	}
	hc := &http.Client{Timeout: 30 * time.Second}
	for i := 0; i < runs; i++ {
		d, err := guestMS(cpuLoad)
		if err != nil {
			return nil, nil, nil, err
		}
		cpu = append(cpu, d)
		if d, err = guestMS(memLoad); err != nil {
			return nil, nil, nil, err
		}
		mem = append(mem, d)
		t0 := time.Now()
		if _, err := get(hc, url); err != nil {
			return nil, nil, nil, err
		}
		lat = append(lat, time.Since(t0))
	}
	return cpu, mem, lat, nil
}

// waitCheckpoints waits until the VM is protected with at least n
// checkpoints committed in this pairing, and returns its protection.
func waitCheckpoints(ctx context.Context, c *client.Client, vm string, iv time.Duration, n int64) (api.Protection, error) {
	deadline := time.Now().Add(time.Minute + time.Duration(n)*(iv+2*time.Second))
	var last *api.Protection
	for time.Now().Before(deadline) {
		v, err := c.VM(ctx, vm)
		if err == nil && v.Protection != nil {
			last = v.Protection
			if last.State == "protected" && last.IntervalMS == iv.Milliseconds() && last.Checkpoints >= n {
				return *last, nil
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	return api.Protection{}, fmt.Errorf("vm %s: %d checkpoints every %s not reached: %+v", vm, n, iv, last)
}

// waitProtected waits for the VM's protection to be "protected".
func waitProtected(ctx context.Context, c *client.Client, vm string, timeout time.Duration) (api.Protection, error) {
	deadline := time.Now().Add(timeout)
	var last *api.Protection
	for time.Now().Before(deadline) {
		if v, err := c.VM(ctx, vm); err == nil && v.Protection != nil {
			last = v.Protection
			if last.State == "protected" && last.Checkpoints > 0 {
				return *last, nil
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	return api.Protection{}, fmt.Errorf("vm %s not protected after %s: %+v", vm, timeout, last)
}

// waitHostState polls until host is in state and returns when it was seen.
func waitHostState(ctx context.Context, c *client.Client, host, state string, timeout time.Duration) (time.Time, error) {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if hs, err := c.Hosts(ctx); err == nil {
			for _, h := range hs {
				if h.Name == host && h.State == state {
					return time.Now(), nil
				}
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	return time.Time{}, fmt.Errorf("host %s not %s after %s", host, state, timeout)
}

// waitAnswer asks the counter service every 20 ms until it answers from
// boot, and returns when.
func waitAnswer(ctx context.Context, url, endpoint, boot string, timeout time.Duration) (time.Time, error) {
	hc := &http.Client{Timeout: 2 * time.Second}
	deadline := time.Now().Add(timeout)
	var last error
	for time.Now().Before(deadline) {
		resp, err := hc.Get(url)
		if err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if f := strings.Fields(string(b)); resp.StatusCode == 200 && len(f) == 2 {
				if f[1] != boot {
					return time.Time{}, fmt.Errorf("the service at %s answers from boot %s, not %s: the guest rebooted", endpoint, f[1], boot)
				}
				return time.Now(), nil
			}
			err = fmt.Errorf("answer %s: %q", resp.Status, b)
		}
		last = err
		time.Sleep(20 * time.Millisecond)
	}
	return time.Time{}, fmt.Errorf("no answer from %s after %s: %v", endpoint, timeout, last)
}

// bareCheckpoints is the baseline of a checkpoint's pause: on bare QEMU,
// by hand, a live save with pause-before-switchover to a local file, the
// disk's internal snapshot taken at the switchover, then cont; the pause
// from QEMU's STOP and RESUME events.
func (b *bench) bareCheckpoints(ctx context.Context, runs int) ([]time.Duration, error) {
	m, err := b.bareMachine("bare-ckpt", protectMem, "")
	if err != nil {
		return nil, err
	}
	bv, err := startBare(ctx, m)
	if err != nil {
		return nil, err
	}
	defer bv.stop()
	if err := nextHeartbeat(m.AgentSocket(), 60*time.Second); err != nil {
		return nil, err
	}
	var out []time.Duration
	for i := 0; i < runs; i++ {
		snap := fmt.Sprintf("ck%d", i)
		events, unsubscribe := bv.mon.Subscribe()
		_, err := qemu.SaveState(ctx, bv.mon, m.Dir, io.Discard, qemu.SaveOptions{AtSwitchover: func(ctx context.Context) error {
			return bv.mon.Run(ctx, "blockdev-snapshot-internal-sync", map[string]any{"device": "disk0", "name": snap}, nil)
		}})
		if cerr := bv.mon.Cont(ctx); err == nil {
			err = cerr
		}
		d := qemu.StoppedFor(events)
		unsubscribe()
		if err != nil {
			return nil, fmt.Errorf("bare checkpoint %d: %w", i, err)
		}
		if d <= 0 {
			return nil, errors.New("bare checkpoint: no STOP and RESUME events")
		}
		out = append(out, d)
		if i > 0 { // keep one, as Vigil does
			bv.mon.Run(ctx, "blockdev-snapshot-delete-internal-sync", map[string]any{"device": "disk0", "name": fmt.Sprintf("ck%d", i-1)}, nil)
		}
		time.Sleep(300 * time.Millisecond)
	}
	return out, nil
}
