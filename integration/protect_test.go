package integration

import (
	"encoding/json"
	"io"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/ckptstream"
	"github.com/vigil-project/vigil/internal/statefile"
	"github.com/vigil-project/vigil/internal/testenv"
)

// counterCGI installs testenv.CounterService and says ok.
const counterCGI = testenv.CounterService + " && echo ok"

// counterClient asks the counter service again and again, one request at
// a time, and keeps every answer.
type counterClient struct {
	mu      sync.Mutex
	answers []counterAnswer
	stop    chan struct{}
	wg      sync.WaitGroup
}

type counterAnswer struct {
	at   time.Time
	n    int
	boot string
}

func startCounterClient(url string) *counterClient {
	c := &counterClient{stop: make(chan struct{})}
	hc := &http.Client{Timeout: 5 * time.Second}
	c.wg.Go(func() {
		for {
			select {
			case <-c.stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
			resp, err := hc.Get(url)
			if err != nil {
				continue
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			f := strings.Fields(string(b))
			if resp.StatusCode != 200 || len(f) != 2 {
				continue
			}
			n, err := strconv.Atoi(f[0])
			if err != nil {
				continue
			}
			c.mu.Lock()
			c.answers = append(c.answers, counterAnswer{time.Now(), n, f[1]})
			c.mu.Unlock()
		}
	})
	return c
}

func (c *counterClient) seen() []counterAnswer {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]counterAnswer(nil), c.answers...)
}

func (c *counterClient) done() []counterAnswer {
	close(c.stop)
	c.wg.Wait()
	return c.seen()
}

// TestProtectedFailover protects a guest that serves a counter kept on its
// disk, kills its host hard (agent and QEMU) while a client keeps asking,
// and checks that the guest continues on its secondary without a reboot:
// same boot id, memory and disk in agreement, and every answer after the
// failover greater than every answer before it (the client never saw state
// the failover lost, as the guest's output waits for its checkpoint to
// commit). At no instant do two QEMUs run it. The old host, back, becomes
// the new secondary.
func TestProtectedFailover(t *testing.T) {
	needIntegration(t)
	c := startPoolCluster(t, "h1", "h2")
	m, dirs, hosts := c.m, c.dirs, c.hosts

	var v api.VM
	json.Unmarshal([]byte(m.mustVigil("vm", "create", "ft", "--host", "h1", "--start", "--wait", "-o", "json")), &v)
	if v.Host != "h1" || v.Guest == nil {
		t.Fatalf("vm on h1: %+v", v)
	}
	boot := v.Guest.BootID
	if got := execOut(t, m, "ft", counterCGI); got != "ok" {
		t.Fatalf("install the counter service: %q", got)
	}
	url := "http://" + v.Endpoint + "/cgi-bin/n"
	if page := httpGet(t, url); !strings.HasPrefix(page, "1 ") {
		t.Fatalf("counter service: %q", page)
	}

	m.mustVigil("vm", "protect", "ft", "--secondary-host", "h2", "--interval", "300ms")
	waitFor(t, "ft protected", 60*time.Second, func() bool {
		p := showVM(t, m, "ft").Protection
		return p != nil && p.State == "protected" && p.Checkpoints >= 3
	})
	p := showVM(t, m, "ft").Protection
	t.Logf("protected: secondary %s, %d checkpoints, pause p50 %.1f ms p99 %.1f ms, %d bytes, %.0f ms each",
		p.SecondaryHost, p.Checkpoints, p.PauseP50MS, p.PauseP99MS, p.BytesPerCheckpoint, p.CheckpointMS)
	if p.SecondaryHost != "h2" || p.BytesPerCheckpoint <= 0 || p.LastCheckpoint == nil {
		t.Fatalf("protection: %+v", p)
	}
	out := m.mustVigil("vm", "show", "ft")
	for _, want := range []string{"PROTECTION:", "protected", "SECONDARY:", "h2", "GUEST PAUSE:"} {
		if !strings.Contains(out, want) {
			t.Fatalf("vm show lacks %q:\n%s", want, out)
		}
	}
	// The user may not name snapshots like the checkpoints' own.
	if _, errs, code := m.vigil("snapshot", "create", "ft", "vigil-ckpt-1"); code == 0 || !strings.Contains(errs, "kept for checkpoints") {
		t.Fatalf("snapshot named like a checkpoint: exit %d %q", code, errs)
	}

	client := startCounterClient(url)
	waitFor(t, "the client served while protected", 30*time.Second, func() bool { return len(client.seen()) >= 5 })
	s := sampleCopies("ft")

	// Kill right after an answer: without the output held until its
	// checkpoint commits, the state behind it would not be on h2 yet.
	n := len(client.seen())
	for len(client.seen()) == n {
		time.Sleep(2 * time.Millisecond)
	}
	hosts["h1"].kill()
	killQEMUs(dirs["h1"])
	killed := time.Now()
	before := client.seen()
	waitFor(t, "ft running on h2", 60*time.Second, func() bool {
		v := showVM(t, m, "ft")
		return v.Host == "h2" && v.State == api.StateRunning
	})
	waitFor(t, "the client served from h2", 30*time.Second, func() bool { return len(client.seen()) > len(before)+3 })
	answers := client.done()
	maxCopies, samples := s.done()

	var maxBefore, firstAfter int
	var firstAfterAt time.Time
	for _, a := range answers {
		if a.boot != boot {
			t.Fatalf("the guest rebooted: boot id %s, was %s", a.boot, boot)
		}
		if !a.at.After(killed) {
			maxBefore = max(maxBefore, a.n)
		} else if firstAfter == 0 {
			firstAfter, firstAfterAt = a.n, a.at
		}
	}
	t.Logf("%d answers; last before the kill %d, first after %d (%.1f s after the kill)", len(answers), maxBefore, firstAfter, firstAfterAt.Sub(killed).Seconds())
	if firstAfter <= maxBefore {
		t.Fatalf("after the failover the counter said %d, but the client had seen %d before: an answer from lost state got out", firstAfter, maxBefore)
	}
	for i := 1; i < len(answers); i++ {
		if answers[i].n <= answers[i-1].n {
			t.Fatalf("the counter went back: %d after %d", answers[i].n, answers[i-1].n)
		}
	}
	if maxCopies != 1 || samples < 100 {
		t.Fatalf("at most %d copies in %d samples: the vm ran twice (or was not sampled)", maxCopies, samples)
	}
	after := showVM(t, m, "ft")
	if after.Guest == nil || after.Guest.BootID != boot {
		t.Fatalf("after the failover the guest reports %+v, want boot %s", after.Guest, boot)
	}
	// Memory and disk agree: the counter the guest has in its page cache is
	// the one its disk holds once written back.
	pair := strings.Fields(execOut(t, m, "ft", "a=$(cat /data/n); sync; echo 3 > /proc/sys/vm/drop_caches; echo $a $(cat /data/n)"))
	if len(pair) != 2 || pair[0] != pair[1] {
		t.Fatalf("counter in memory and on disk: %q", pair)
	}
	incs := incidents(t, m, "ft")
	if len(incs) == 0 {
		t.Fatal("no incident for the failover")
	}
	inc := incs[len(incs)-1]
	if steps := strings.Join(incidentEvents(inc), ","); !strings.Contains(steps, "continued from checkpoint") || strings.Contains(steps, "restarted,") {
		t.Fatalf("incident timeline %v", incidentEvents(inc))
	}
	for _, e := range inc.Timeline {
		t.Logf("incident: %s %s: %s", e.Time.Format("15:04:05.000"), e.Event, e.Detail)
	}
	t.Logf("killed %s, first answer after it %s", killed.Format("15:04:05.000"), firstAfterAt.Format("15:04:05.000"))

	// h1 comes back and becomes the secondary of the VM's new primary.
	c.startHost("h1", "")
	waitFor(t, "ft protected again, on h1", 90*time.Second, func() bool {
		p := showVM(t, m, "ft").Protection
		return p != nil && p.State == "protected" && p.SecondaryHost == "h1"
	})
	m.mustVigil("vm", "unprotect", "ft")
	if showVM(t, m, "ft").Protection != nil {
		t.Fatal("still protected after unprotect")
	}
}

// TestProtectionSecondaryLoss loses the secondary in two ways while the
// primary runs on: killed mid-stream (its committed checkpoint stays whole,
// and it is paired again once back), then frozen past its death (the VM is
// degraded, then protected on the third host). The VM never moves and
// never runs twice.
func TestProtectionSecondaryLoss(t *testing.T) {
	needIntegration(t)
	c := startPoolCluster(t, "h1", "h2", "h3")
	m, hosts := c.m, c.hosts
	var v api.VM
	json.Unmarshal([]byte(m.mustVigil("vm", "create", "sec", "--host", "h1", "--start", "--wait", "-o", "json")), &v)
	if v.Guest == nil {
		t.Fatalf("no guest: %+v", v)
	}
	boot := v.Guest.BootID
	m.mustVigil("vm", "protect", "sec", "--secondary-host", "h2", "--interval", "200ms")
	protectedOn := func(host string, timeout time.Duration) {
		t.Helper()
		waitFor(t, "sec protected on "+host, timeout, func() bool {
			p := showVM(t, m, "sec").Protection
			return p != nil && p.State == "protected" && p.SecondaryHost == host && p.Checkpoints > 0
		})
	}
	protectedOn("h2", 60*time.Second)
	s := sampleCopies("sec")

	// 1. The secondary's agent dies while checkpoints stream (they do all
	// the time at this interval): what it had committed is whole.
	hosts["h2"].kill()
	ckpt := filepath.Join(c.dirs["h2"], "host", "standby", "sec", ckptstream.CommittedFile)
	r, err := statefile.Open(ckpt)
	if err != nil {
		t.Fatalf("the secondary's committed checkpoint after its agent died: %v", err)
	}
	if err := r.Verify(nil); err != nil || r.Info().Checkpoint == nil {
		t.Fatalf("the secondary's committed checkpoint: %v, %+v", err, r.Info().Checkpoint)
	}
	r.Close()
	waitFor(t, "sec degraded", 30*time.Second, func() bool {
		p := showVM(t, m, "sec").Protection
		return p != nil && p.State == "degraded"
	})
	c.startHost("h2", "")
	protectedOn("h2", 60*time.Second)

	// 2. The secondary freezes past its death: it never activates (it
	// cannot, and nobody asks it to); the VM is protected on h3.
	hosts["h2"].cmd.Process.Signal(syscall.SIGSTOP)
	waitFor(t, "sec degraded while h2 is frozen", 30*time.Second, func() bool {
		p := showVM(t, m, "sec").Protection
		return p != nil && p.State == "degraded"
	})
	protectedOn("h3", 90*time.Second)
	hosts["h2"].cmd.Process.Signal(syscall.SIGCONT)
	waitFor(t, "h2 back", 30*time.Second, func() bool { return hostList(t, m)["h2"].State == "up" })
	time.Sleep(2 * time.Second)

	maxCopies, samples := s.done()
	after := showVM(t, m, "sec")
	if after.Host != "h1" || after.State != api.StateRunning || after.Guest == nil || after.Guest.BootID != boot {
		t.Fatalf("after losing its secondary twice the vm is %s on %s, guest %+v; want running on h1, boot %s", after.State, after.Host, after.Guest, boot)
	}
	if after.Protection == nil || after.Protection.SecondaryHost != "h3" {
		t.Fatalf("protection %+v, want the standby on h3", after.Protection)
	}
	if maxCopies != 1 || samples < 100 {
		t.Fatalf("at most %d copies in %d samples", maxCopies, samples)
	}
	if incs := incidents(t, m, "sec"); len(incs) != 0 {
		t.Fatalf("incidents for a vm that never failed: %+v", incs)
	}
}
