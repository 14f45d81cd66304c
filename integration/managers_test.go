package integration

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/vigil-project/vigil/api"
)

func isLeader(addr string) bool {
	// /v1/health needs no token; the leader flag is all this reads, so the
	// server's certificate is not checked here.
	c := &http.Client{Timeout: time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
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

// TestManagerFailover runs three managers over an embedded three-member etcd
// cluster and one host agent. Killing the leading manager: another leads,
// the API keeps answering writes, the host agent reconnects, and no VM is
// restarted because of it.
func TestManagerFailover(t *testing.T) {
	needIntegration(t)
	var addrs, peers []string
	mgrs := map[string]*proc{}
	dirs := map[string]string{}
	for i := 1; i <= 3; i++ {
		addrs = append(addrs, freeAddr(t))
		peers = append(peers, fmt.Sprintf("m%d=http://%s", i, freeAddr(t)))
	}
	for i := 1; i <= 3; i++ {
		dirs[addrs[i-1]] = shortTempDir(t)
		mgrs[addrs[i-1]] = startProc(t, "agent", "--manager", "--name", fmt.Sprintf("m%d", i), "--etcd-peers", strings.Join(peers, ","),
			"--listen", addrs[i-1], "--data-dir", dirs[addrs[i-1]])
	}
	var leader string
	waitFor(t, "a leader", 60*time.Second, func() bool {
		for _, a := range addrs {
			if isLeader(a) {
				leader = a
				return true
			}
		}
		return false
	})
	var other string
	for _, a := range addrs {
		if a != leader {
			other = a
			break
		}
	}
	m := &devAgent{t: t, addr: other, dataDir: dirs[other]}
	var urls []string
	for _, a := range append([]string{leader}, addrs...) { // the leader first: the host will lose it
		urls = append(urls, "https://"+a)
	}
	hostDir := shortTempDir(t)
	tok := strings.TrimSpace(m.mustVigil("host", "join-token", "-q"))
	startProc(t, "agent", "--host", "--name", "h1", "--manager", strings.Join(urls, ","), "--join-token", tok,
		"--data-dir", hostDir, "--image-dir", imageDir)
	t.Cleanup(func() { killQEMUs(hostDir) })
	waitFor(t, "host up", 30*time.Second, func() bool { return hostList(t, m)["h1"].State == "up" })
	var vm api.VM
	json.Unmarshal([]byte(m.mustVigil("vm", "create", "v1", "--start", "--wait", "-o", "json")), &vm)
	if vm.Guest == nil {
		t.Fatalf("vm: %+v", vm)
	}

	mgrs[leader].kill()
	killed := time.Now()
	// Writes are answered again by the survivors.
	i := 0
	waitFor(t, "writes after the leader died", 30*time.Second, func() bool {
		i++
		_, _, code := m.vigil("vm", "create", fmt.Sprintf("probe%d", i), "-q")
		return code == 0
	})
	t.Logf("writes answered %s after the leader was killed", time.Since(killed).Round(time.Millisecond))
	waitFor(t, "a new leader", 30*time.Second, func() bool {
		for _, a := range addrs {
			if a != leader && isLeader(a) {
				return true
			}
		}
		return false
	})
	// The host agent reconnects to a surviving manager.
	before := hostList(t, m)["h1"].LastHeartbeat
	waitFor(t, "host heartbeats through a survivor", 30*time.Second, func() bool {
		h := hostList(t, m)["h1"]
		return h.State == "up" && h.LastHeartbeat.After(before.Add(2*time.Second))
	})
	// Nothing was restarted.
	time.Sleep(3 * time.Second)
	after := showVM(t, m, "v1")
	if after.PID != vm.PID || after.Guest == nil || after.Guest.BootID != vm.Guest.BootID || after.State != api.StateRunning {
		t.Fatalf("the vm changed when the manager failed over: %+v", after)
	}
	if incs, _ := m.client().Incidents(context.Background(), "v1"); len(incs) != 0 {
		t.Fatalf("incidents after a manager failover: %+v", incs)
	}
	m.mustVigil("vm", "delete", "v1")
}
