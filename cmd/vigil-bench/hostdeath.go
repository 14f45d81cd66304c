package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/client"
	"github.com/vigil-project/vigil/internal/manager"
	"github.com/vigil-project/vigil/internal/qemu"
)

// hostDeath measures host failover: a manager and hosts h1, h2, h3 share a
// storage pool; N VMs run on h1; h1's agent and QEMUs are SIGKILLed; how
// long until every VM serves again from another host, seen by a client.
// The baseline is the floor of any design that waits out the same
// detection window: the host-dead time plus a bare reboot of the same
// guests on this machine.
func (b *bench) hostDeath(ctx context.Context) ([]row, error) {
	bin, err := qemu.FindBinary()
	if err != nil {
		return nil, err
	}
	var rows []row
	fast := timing{fenceAfter: 3 * time.Second, deadAfter: 5 * time.Second}
	for _, c := range []struct {
		vms int
		tm  timing
	}{{1, timing{}}, {5, timing{}}, {5, fast}} {
		deadAfter := manager.DefaultHostDeadAfter
		if c.tm.deadAfter > 0 {
			deadAfter = c.tm.deadAfter
		}
		how := fmt.Sprintf("Hosts heartbeat every 1 s and the leader looks every 0.5 s: a host is declared dead %.0f–%.1f s after its last heartbeat. "+
			"The bench kills h1 just after one (its waits return on a heartbeat), so detection here takes the whole window; a kill later in the second is detected up to 1 s sooner. "+
			"Target ≤ 15 s; context: Proxmox HA ~2 min, KubeVirt > 100 s, vSphere HA declares a host dead after 15 s and then restarts its VMs", deadAfter.Seconds(), deadAfter.Seconds()+0.5)
		// Bare baseline: c.vms guests rebooting their formatted disks at
		// once, as the failed-over guests do. This first boot formats the
		// disks and is not counted.
		bareName := fmt.Sprintf("bare-hd%d", c.vms)
		if _, err := b.bareBootMany(ctx, bin, bareName, c.vms); err != nil {
			return nil, err
		}
		var all, first, floor []time.Duration
		var last hostDeathRun
		for r := 0; r < b.runs; r++ {
			// Alternate, so drift in the machine's load hits both sides alike.
			res, err := b.hostDeathOnce(ctx, filepath.Join(b.tmp, fmt.Sprintf("hd%d-%d-%d", c.vms, r, c.tm.deadAfter/time.Second)), c.vms, c.tm)
			if err != nil {
				return nil, err
			}
			all = append(all, res.all)
			first = append(first, res.first)
			last = res
			bare, err := b.bareBootMany(ctx, bin, bareName, c.vms)
			if err != nil {
				return nil, err
			}
			floor = append(floor, deadAfter+bare)
		}
		what := fmt.Sprintf("Host death (agent + QEMUs SIGKILLed), 1 VM on it: kill → VM serving again on another host (%d runs)", b.runs)
		if c.vms > 1 {
			what = fmt.Sprintf("Host death, %d VMs on it: kill → all %d serving again on other hosts (%d runs)", c.vms, c.vms, b.runs)
		}
		if c.tm.deadAfter > 0 {
			what += fmt.Sprintf(", with --host-dead-after %s and --fence-after %s (defaults 8 s and 5 s)", c.tm.deadAfter, c.tm.fenceAfter)
		}
		note := "last run: "
		if c.vms > 1 {
			note = fmt.Sprintf("first VM serving after p50 %s; last run: placed on %s, ", ms(p(first, 50)), last.placement())
		}
		rows = append(rows, versus(what, all, floor, ms,
			fmt.Sprintf("%.0f s host-dead time + bare QEMU rebooting %s to the first heartbeat", deadAfter.Seconds(), guests(c.vms)),
			note+last.breakdown()+". "+how))
	}
	return rows, nil
}

func guests(n int) string {
	if n == 1 {
		return "the same guest and disk"
	}
	return fmt.Sprintf("%d such guests at once", n)
}

// bareBootMany boots n bare guests at once and returns the wall time until
// every guest has sent its first heartbeat. Their disks, under b.tmp/name-i,
// are kept: the first call formats them, later ones reboot formatted disks.
func (b *bench) bareBootMany(ctx context.Context, bin, name string, n int) (time.Duration, error) {
	t0 := time.Now()
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		go func() {
			_, err := bareBoot(ctx, bin, b.accel, b.img, filepath.Join(b.tmp, fmt.Sprintf("%s-%d", name, i)))
			errs <- err
		}()
	}
	var first error
	for i := 0; i < n; i++ {
		if err := <-errs; err != nil && first == nil {
			first = err
		}
	}
	if first != nil {
		return 0, first
	}
	return time.Since(t0), nil
}

// hostDeathRun is the outcome of one host death.
type hostDeathRun struct {
	first, all time.Duration
	// The VM that served last, when, and its incident.
	lastVM    string
	t0, serve time.Time
	inc       api.Incident
	hosts     map[string]int // where the VMs went
}

func (r hostDeathRun) placement() string {
	var parts []string
	for _, h := range []string{"h2", "h3"} {
		parts = append(parts, fmt.Sprintf("%s ×%d", h, r.hosts[h]))
	}
	return strings.Join(parts, ", ")
}

// breakdown reads the slowest VM's incident timeline against the kill.
func (r hostDeathRun) breakdown() string {
	at := map[string]time.Time{}
	for _, e := range r.inc.Timeline {
		at[e.Event] = e.Time
	}
	rel := func(t time.Time) string { return fmt.Sprintf("%+.2f s", t.Sub(r.t0).Seconds()) }
	var parts []string
	for _, ev := range []string{"last heartbeat", "declared dead", "moved", "restarted", "guest back"} {
		if t, ok := at[ev]; ok {
			parts = append(parts, ev+" "+rel(t))
		}
	}
	parts = append(parts, "serving "+rel(r.serve))
	s := fmt.Sprintf("timeline of %s (last to serve), from the kill: %s", r.lastVM, strings.Join(parts, ", "))
	dead, ok1 := at["declared dead"]
	restarted, ok2 := at["restarted"]
	back, ok3 := at["guest back"]
	if ok1 && ok2 && ok3 {
		s += fmt.Sprintf(" — detection %.1f s, move and start %.1f s, guest boot %.1f s, boot → HTTP answer %.1f s",
			dead.Sub(r.t0).Seconds(), restarted.Sub(dead).Seconds(), back.Sub(restarted).Seconds(), r.serve.Sub(back).Seconds())
	}
	return s
}

// hostDeathOnce starts a fresh three-host cluster, boots n VMs pinned to
// h1, kills h1 and times each VM until its endpoint answers with the boot
// id of a new boot on another host.
func (b *bench) hostDeathOnce(ctx context.Context, dir string, n int, tm timing) (hostDeathRun, error) {
	var res hostDeathRun
	cl, err := startCluster(ctx, dir, tm, "h1", "h2", "h3")
	if err != nil {
		return res, err
	}
	defer cl.stop()
	fail := func(err error) (hostDeathRun, error) { return res, fmt.Errorf("%w%s", err, cl.logTails(30)) }
	c := cl.c

	var names []string
	for i := 1; i <= n; i++ {
		name := fmt.Sprintf("hd%d", i)
		if _, err := c.CreateVM(ctx, api.VMCreateRequest{Name: name, MemoryBytes: 128 << 20, CPUs: 1, DiskBytes: 256 << 20, Start: true, Host: "h1"}); err != nil {
			return fail(fmt.Errorf("create %s: %w", name, err))
		}
		names = append(names, name)
	}
	old := map[string]string{}
	for _, name := range names {
		v, err := c.WaitGuest(ctx, name)
		if err != nil {
			return fail(fmt.Errorf("wait for %s: %w", name, err))
		}
		if v.Host != "h1" || v.Guest == nil {
			return fail(fmt.Errorf("vm %s is on %q, guest %+v; want it on h1 with a guest", name, v.Host, v.Guest))
		}
		// The check used after the kill must pass before it.
		if err := waitServing(ctx, v.Endpoint, v.Guest.BootID, 30*time.Second); err != nil {
			return fail(fmt.Errorf("vm %s before the kill: %w", name, err))
		}
		old[name] = v.Guest.BootID
	}

	type served struct {
		name, host string
		at         time.Time
		err        error
	}
	out := make(chan served, n)
	var wg sync.WaitGroup
	defer wg.Wait() // after cancel, below
	wctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	res.t0 = time.Now()
	if err := cl.killHost("h1"); err != nil {
		return fail(err)
	}
	for _, name := range names {
		wg.Add(1)
		go func() {
			defer wg.Done()
			host, at, err := waitMoved(wctx, c, name, "h1", old[name])
			out <- served{name, host, at, err}
		}()
	}
	res.hosts = map[string]int{}
	for range names {
		s := <-out
		res.hosts[s.host]++
		if s.err != nil {
			return fail(fmt.Errorf("vm %s after h1 died: %w", s.name, s.err))
		}
		d := s.at.Sub(res.t0)
		if res.first == 0 || d < res.first {
			res.first = d
		}
		if d > res.all {
			res.all, res.lastVM, res.serve = d, s.name, s.at
		}
	}

	if hs, err := c.Hosts(ctx); err == nil {
		for _, h := range hs {
			if h.Name == "h1" && h.State != "dead" {
				return fail(fmt.Errorf("h1 is %s after its VMs moved, want dead", h.State))
			}
		}
	}
	// The incident gets "guest back" when the first heartbeat arrives,
	// which the serving check has already seen.
	for t := time.Now(); ; time.Sleep(100 * time.Millisecond) {
		incs, err := c.Incidents(ctx, res.lastVM)
		if err != nil {
			return fail(err)
		}
		if len(incs) > 0 && incs[len(incs)-1].Kind == "host-failure" && incs[len(incs)-1].RecoveredAt != nil {
			res.inc = incs[len(incs)-1]
			break
		}
		if time.Since(t) > 10*time.Second {
			return fail(fmt.Errorf("vm %s serves again but has no recovered host-failure incident: %+v", res.lastVM, incs))
		}
	}
	return res, nil
}

// waitMoved polls every 100 ms until the API shows vm on a host other than
// from with a new boot, and its endpoint answers with that boot's id; it
// returns the new host and when.
func waitMoved(ctx context.Context, c *client.Client, vm, from, oldBoot string) (string, time.Time, error) {
	hc := &http.Client{Timeout: time.Second}
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	var last api.VM
	for {
		select {
		case <-ctx.Done():
			return "", time.Time{}, fmt.Errorf("not serving from another host in time; last seen on %q, state %s, message %q", last.Host, last.State, last.Message)
		case <-t.C:
		}
		v, err := c.VM(ctx, vm)
		if err != nil {
			continue
		}
		last = v
		if v.Host == from || v.Host == "" || v.Guest == nil || v.Guest.BootID == oldBoot {
			continue
		}
		if body, err := get(hc, "http://"+v.Endpoint+"/"); err == nil && strings.Contains(body, v.Guest.BootID) {
			return v.Host, time.Now(), nil
		}
	}
}

// waitServing waits until endpoint answers with bootID.
func waitServing(ctx context.Context, endpoint, bootID string, timeout time.Duration) error {
	hc := &http.Client{Timeout: time.Second}
	var body string
	var err error
	for t := time.Now(); time.Since(t) < timeout; time.Sleep(100 * time.Millisecond) {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if body, err = get(hc, "http://"+endpoint+"/"); err == nil && strings.Contains(body, bootID) {
			return nil
		}
	}
	if err != nil {
		return fmt.Errorf("endpoint %s: %w", endpoint, err)
	}
	return fmt.Errorf("endpoint %s does not show boot id %s: %q", endpoint, bootID, body)
}

func get(hc *http.Client, url string) (string, error) {
	resp, err := hc.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("%s: %s", url, resp.Status)
	}
	return string(body), nil
}
