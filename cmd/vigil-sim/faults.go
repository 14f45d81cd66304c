package main

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/client"
)

// copies samples, every few milliseconds until stop is called, on how many
// simulated hosts each VM of watch runs at once (skipping dead and frozen
// hosts, whose VMs run nothing, and skip), and returns the most seen for
// one VM and which; watch nil: every VM. Only the VMs a fault moves can
// run twice: sampling all 20,000 took a share of the two cores the
// managers need.
func (s *sim) copies(skip *simulated, watch []string) (stop func() (int, string)) {
	done := make(chan struct{})
	var mu sync.Mutex
	most, which := 0, ""
	var wg sync.WaitGroup
	wg.Go(func() {
		t := time.NewTicker(20 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
			}
			on := map[string]int{}
			for _, h := range s.hosts {
				if h == skip || h.dead || h.frozen.Load() || h.host == nil {
					continue
				}
				var vms []string
				if watch == nil {
					vms = h.host.Running()
				} else {
					vms = h.host.RunningAmong(watch)
				}
				for _, vm := range vms {
					on[vm]++
				}
			}
			mu.Lock()
			for vm, n := range on {
				if n > most {
					most, which = n, vm
				}
			}
			mu.Unlock()
		}
	})
	return func() (int, string) {
		close(done)
		wg.Wait()
		return most, which
	}
}

// hostFreeze hangs one simulated host (nothing it does goes on, as in a
// kernel hang), waits until the managers have declared it dead and its VMs
// run elsewhere, then wakes it: it must find it was declared dead, kill
// its copies and join again. Throughout, no VM may run on two hosts.
func (s *sim) hostFreeze(ctx context.Context, deadAfter time.Duration) error {
	var victim *simulated
	for i := range s.hosts {
		if h := s.hosts[(len(s.hosts)/3+i)%len(s.hosts)]; !h.dead {
			victim = h
			break
		}
	}
	if victim == nil {
		return fmt.Errorf("no live host to freeze")
	}
	mine, err := s.c.AllVMs(ctx, client.ListOptions{Host: victim.name})
	if err != nil {
		return err
	}
	ch, err := s.events(ctx)
	if err != nil {
		return err
	}
	// The frozen host is left out: reading it would wait (and a read that
	// raced the freeze would report its VMs from before). What it runs
	// once woken is timed below, until its watchdog has killed them.
	names := make([]string, len(mine))
	for i, v := range mine {
		names[i] = v.Name
	}
	stop := s.copies(victim, names)
	t0 := time.Now()
	victim.frozen.Store(true)
	victim.host.Freeze()
	dead, last, err := s.awaitMoved(ch, victim.name, mine, t0, deadAfter)
	if err != nil {
		victim.host.Thaw()
		victim.frozen.Store(false)
		stop()
		return err
	}
	time.Sleep(2 * time.Second)
	thawed := time.Now()
	victim.host.Thaw()
	victim.frozen.Store(false)
	// It kills its copies (every VM it had moved), then joins again: up,
	// with two heartbeats taken since it woke (the first time seen may be
	// its registration's).
	var fenced, back, firstBeat time.Time
	for deadline := time.Now().Add(deadAfter + time.Minute); fenced.IsZero() || back.IsZero(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			stop()
			return fmt.Errorf("the thawed host %s: fenced %v, up again %v after %s", victim.name, !fenced.IsZero(), !back.IsZero(), time.Since(thawed).Round(time.Second))
		}
		if fenced.IsZero() && !slices.ContainsFunc(victim.host.Running(), func(vm string) bool {
			return slices.ContainsFunc(mine, func(v api.VM) bool { return v.Name == vm })
		}) {
			fenced = time.Now()
		}
		if back.IsZero() {
			if hs, err := s.c.Hosts(ctx); err == nil {
				for _, h := range hs {
					switch {
					case h.Name != victim.name || h.State != "up" || !h.LastHeartbeat.After(thawed):
					case firstBeat.IsZero():
						firstBeat = h.LastHeartbeat
					case h.LastHeartbeat.After(firstBeat):
						back = time.Now()
					}
				}
			}
		}
	}
	time.Sleep(2 * time.Second)
	most, which := stop()
	if back.Before(fenced) {
		return fmt.Errorf("the woken host %s was heartbeating again %s before it had killed its copies", victim.name, fenced.Sub(back))
	}
	s.line("## Host freeze")
	s.line("")
	s.line("Host %s (%d VMs) hung (its heartbeats, its server's answers and its fencing watchdog all wait), woken 2 s after its VMs ran elsewhere.", victim.name, len(mine))
	s.line("")
	s.line("| Measure | Value |")
	s.line("|---|---|")
	s.line("| Declared dead after | %s |", dead.Sub(t0).Round(time.Millisecond))
	s.line("| Their records all moved to other hosts (vm.relocated) | %s after the death was declared |", s.relocated.Sub(dead).Round(time.Millisecond))
	s.line("| Its VMs all running on other hosts | %s after the death was declared (%s after the freeze) |", last.Sub(dead).Round(time.Millisecond), last.Sub(t0).Round(time.Millisecond))
	s.line("| Woken: its copies killed | %s after waking |", fenced.Sub(thawed).Round(time.Millisecond))
	s.line("| Woken: up again (joined, heartbeating) | %s after waking |", back.Sub(thawed).Round(time.Millisecond))
	verdict := "never more than one"
	if most > 1 {
		verdict = fmt.Sprintf("**%d copies of %s at once**", most, which)
	}
	s.line("| Copies of one VM running at once on the other hosts (sampled every 20 ms, from the freeze until 2 s after it was up again) | %s |", verdict)
	s.line("")
	s.line("Woken, the host's copies run on until its watchdog kills them (the time above), beside those restarted elsewhere: the simulator has no disks. On real hosts the restarted copy does not start while the frozen host's QEMU holds its disk's lock (the lock probe, docs/architecture.md).")
	s.line("")
	if most > 1 {
		return fmt.Errorf("two copies of %s ran at once", which)
	}
	return nil
}

// managerDrop kills the leading manager (and with it its etcd member) and
// measures how the others carry on: a new leader, writes answered, every
// host heard again through the survivors, and no host declared dead and no
// VM stopped because of it.
func (s *sim) managerDrop(ctx context.Context, deadAfter time.Duration) error {
	lead := s.leader()
	if lead == nil {
		return fmt.Errorf("no manager leads")
	}
	for _, m := range s.live() {
		if m != lead {
			s.c = m.c
			break
		}
	}
	ch, err := s.events(ctx)
	if err != nil {
		return err
	}
	running := func() int {
		n := 0
		for _, h := range s.hosts {
			if !h.dead && h.host != nil {
				n += len(h.host.Running())
			}
		}
		return n
	}
	before, k0 := running(), s.counts()
	stop := s.copies(nil, nil) // a manager's death may leave any VM's operation half-done
	t0 := time.Now()
	lead.cmd.Process.Kill()
	lead.cmd.Wait()
	lead.gone = true
	var led, wrote, heard time.Time
	for deadline := t0.Add(2 * time.Minute); led.IsZero() || wrote.IsZero() || heard.IsZero(); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			stop()
			return fmt.Errorf("after the leading manager died: a new leader %v, writes %v, every host heard %v", !led.IsZero(), !wrote.IsZero(), !heard.IsZero())
		}
		if led.IsZero() && s.leader() != nil {
			led = time.Now()
		}
		if wrote.IsZero() {
			wctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			if _, err := s.c.JoinToken(wctx, ""); err == nil {
				wrote = time.Now()
			}
			cancel()
		}
		if heard.IsZero() {
			if hs, err := s.c.Hosts(ctx); err == nil {
				all := true
				for _, h := range hs {
					if h.State != "dead" && !h.LastHeartbeat.After(t0.Add(time.Second)) {
						all = false
						break
					}
				}
				if all {
					heard = time.Now()
				}
			}
		}
	}
	// Long enough for any host that lost its heartbeats to be declared dead.
	time.Sleep(deadAfter + 2*time.Second)
	most, which := stop()
	deaths := 0
	for len(ch) > 0 {
		if x := <-ch; x.e.Type == "host.dead" {
			deaths++
		}
	}
	after, k1 := running(), s.counts()
	// Hosts that fenced (no manager could record their heartbeats for the
	// fence time) killed their VMs; the managers restart them: how long
	// until every VM runs again.
	var whole time.Duration
	if after < before {
		for deadline := time.Now().Add(5 * time.Minute); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
			if running() >= before {
				whole = time.Since(t0)
				break
			}
		}
	}
	s.line("## Manager loss")
	s.line("")
	s.line("The leading manager %s killed (SIGKILL; its etcd member with it). A third of the hosts reported to it.", lead.name)
	s.line("")
	s.line("| Measure | Value |")
	s.line("|---|---|")
	s.line("| Another manager leads | %s after the kill |", led.Sub(t0).Round(time.Millisecond))
	s.line("| Writes answered (through a survivor) | %s after the kill |", wrote.Sub(t0).Round(time.Millisecond))
	s.line("| Every host heard again through the survivors | %s after the kill |", heard.Sub(t0).Round(time.Millisecond))
	s.line("| Hosts declared dead because of it (watched for %s more) | %d |", deadAfter+2*time.Second, deaths)
	s.line("| VMs running before / after | %d / %d |", before, after)
	s.line("| Hosts' fences meanwhile (cut off from every manager for the fence time) | %d, killing %d VMs |", k1.Fences-k0.Fences, k1.FencedVMs-k0.FencedVMs)
	switch {
	case after >= before:
	case whole > 0:
		s.line("| Every VM running again | %s after the kill |", whole.Round(time.Millisecond))
	default:
		s.line("| Every VM running again | not within 5 min (%d running) |", running())
	}
	s.line("| Copies of one VM running at once | %d |", most)
	s.line("")
	if most > 1 {
		return fmt.Errorf("two copies of %s ran at once", which)
	}
	return nil
}
