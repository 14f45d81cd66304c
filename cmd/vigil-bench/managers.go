package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/vigil-project/vigil/client"
)

// managers measures manager failover: three managers over an embedded
// three-member etcd; the leader is killed; how long until the API answers
// writes again, and until another manager leads.
func (b *bench) managers(ctx context.Context) ([]row, error) {
	bin := filepath.Join(os.Getenv("VIGIL_BIN"), "vigil")
	var writes, leads []time.Duration
	for r := 0; r < b.runs; r++ {
		w, l, err := managerFailover(ctx, bin, filepath.Join(b.tmp, fmt.Sprintf("mgr%d", r)))
		if err != nil {
			return nil, err
		}
		writes = append(writes, w)
		leads = append(leads, l)
	}
	// No baseline series: bare QEMU has no manager to fail over. A new
	// leader cannot come before the dead one's session expires, so that
	// TTL is the second row's floor.
	return []row{
		{what: fmt.Sprintf("Manager failover (3 managers, leader SIGKILLed): until the API answers writes (%d runs)", b.runs), vigil: pctWith(writes, ms1),
			baseline: "-", ratio: "-", note: "a write = a join token stored through a surviving manager"},
		{what: "Manager failover: until another manager leads (runs the controllers)", vigil: pctWith(leads, ms1),
			baseline: "3 s (the leader's etcd session TTL)", ratio: "-", note: "the dead leader's election key expires with its session"},
	}, nil
}

func managerFailover(ctx context.Context, bin, dir string) (time.Duration, time.Duration, error) {
	var addrs, peers []string
	for i := 1; i <= 3; i++ {
		a, err := freeAddr()
		if err != nil {
			return 0, 0, err
		}
		p, err := freeAddr()
		if err != nil {
			return 0, 0, err
		}
		addrs = append(addrs, a)
		peers = append(peers, fmt.Sprintf("m%d=http://%s", i, p))
	}
	cmds := map[string]*exec.Cmd{}
	defer func() {
		for _, c := range cmds {
			c.Process.Signal(syscall.SIGKILL)
			c.Wait()
		}
	}()
	for i, a := range addrs {
		c := exec.CommandContext(ctx, bin, "agent", "--manager", "--name", fmt.Sprintf("m%d", i+1), "--etcd-peers", strings.Join(peers, ","),
			"--listen", a, "--data-dir", filepath.Join(dir, fmt.Sprint(i)))
		if err := c.Start(); err != nil {
			return 0, 0, err
		}
		cmds[a] = c
	}
	leaderOf := func(skip string) string {
		for _, a := range addrs {
			if a != skip && leading(a) {
				return a
			}
		}
		return ""
	}
	var leader string
	for t0 := time.Now(); leader == ""; leader = leaderOf("") {
		if time.Since(t0) > time.Minute {
			return 0, 0, fmt.Errorf("no manager leads after a minute")
		}
		time.Sleep(50 * time.Millisecond)
	}
	var survivor string
	for _, a := range addrs {
		if a != leader {
			survivor = a
			break
		}
	}
	var c *client.Client
	for i, a := range addrs {
		if a == survivor {
			c = clientFor(filepath.Join(dir, fmt.Sprint(i)))
		}
	}
	cmds[leader].Process.Signal(syscall.SIGKILL)
	cmds[leader].Wait()
	delete(cmds, leader)
	t0 := time.Now()
	var writes time.Duration
	for {
		wctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		_, err := c.JoinToken(wctx, "")
		cancel()
		if err == nil {
			writes = time.Since(t0)
			break
		}
		if time.Since(t0) > time.Minute {
			return 0, 0, fmt.Errorf("no writes a minute after the leader died: %w", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	for leaderOf(leader) == "" {
		if time.Since(t0) > time.Minute {
			return 0, 0, fmt.Errorf("no new leader after a minute")
		}
		time.Sleep(20 * time.Millisecond)
	}
	return writes, time.Since(t0), nil
}

func leading(addr string) bool {
	// /v1/health needs no token, and only the leader flag is read.
	c := &http.Client{Timeout: 500 * time.Millisecond, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	resp, err := c.Get("https://" + addr + "/v1/health")
	if err != nil {
		return false
	}
	defer resp.Body.Close()
	var h struct {
		Leader bool `json:"leader"`
	}
	json.NewDecoder(resp.Body).Decode(&h)
	return h.Leader
}
