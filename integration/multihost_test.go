package integration

import (
	"bytes"
	"encoding/json"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/client"
	"github.com/vigil-project/vigil/internal/pki"
)

// proc is a vigil agent process (manager or host) under test.
type proc struct {
	cmd *exec.Cmd
	log *bytes.Buffer
}

func startProc(t *testing.T, args ...string) *proc {
	t.Helper()
	p := &proc{log: &bytes.Buffer{}}
	p.cmd = exec.Command(filepath.Join(binDir, "vigil"), args...)
	p.cmd.Stdout, p.cmd.Stderr = p.log, p.log
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		p.kill()
		if t.Failed() {
			t.Logf("log of %v:\n%s", args, p.log)
		}
	})
	return p
}

func (p *proc) kill() {
	if p.cmd.ProcessState == nil {
		p.cmd.Process.Signal(syscall.SIGKILL)
		p.cmd.Wait()
	}
}

func hostList(t *testing.T, a *devAgent) map[string]api.Host {
	t.Helper()
	var hs []api.Host
	json.Unmarshal([]byte(a.mustVigil("host", "list", "-o", "json")), &hs)
	m := map[string]api.Host{}
	for _, h := range hs {
		m[h.Name] = h
	}
	return m
}

// TestManagerWithHosts runs a manager and two host agents as separate
// processes: join tokens, placement and pinning, a guest on each host, a
// placement that cannot fit, and a host agent that restarts and comes back
// with its secret, adopting its VM.
func TestManagerWithHosts(t *testing.T) {
	needIntegration(t)
	m := &devAgent{t: t, dataDir: shortTempDir(t), addr: freeAddr(t)}
	startProc(t, "agent", "--manager", "--listen", m.addr, "--data-dir", m.dataDir)
	waitFor(t, "manager", 60*time.Second, func() bool {
		_, _, code := m.vigil("host", "list")
		return code == 0
	})
	managerURL := "https://" + m.addr

	// Without a valid token a host is refused, and says why: a token for
	// this cluster (its CA's fingerprint) with a made-up secret, a token
	// for another cluster, and something that is no token.
	cfg, err := client.LoadConfig(m.configPath())
	if err != nil {
		t.Fatal(err)
	}
	ca, err := pki.ParseCert([]byte(cfg.CACert))
	if err != nil {
		t.Fatal(err)
	}
	for forged, want := range map[string]string{
		pki.NewJoinToken(pki.Fingerprint(ca)).String():      "no valid join token",
		pki.NewJoinToken(strings.Repeat("ab", 32)).String(): "does not match the join token's fingerprint",
		"forged": "vj1.ID.SECRET.FINGERPRINT",
	} {
		out, err := exec.Command(filepath.Join(binDir, "vigil"), "agent", "--host", "--name", "intruder", "--manager", managerURL,
			"--join-token", forged, "--data-dir", shortTempDir(t), "--image-dir", imageDir).CombinedOutput()
		if err == nil || !strings.Contains(string(out), want) {
			t.Fatalf("host with the forged token %q: %v\n%s", forged, err, out)
		}
	}

	hostDirs := map[string]string{}
	hosts := map[string]*proc{}
	startHost := func(name, token string) {
		hosts[name] = startProc(t, "agent", "--host", "--name", name, "--manager", managerURL, "--join-token", token,
			"--data-dir", hostDirs[name], "--image-dir", imageDir)
	}
	for _, name := range []string{"h1", "h2"} {
		hostDirs[name] = shortTempDir(t)
		tok := strings.TrimSpace(m.mustVigil("host", "join-token", "-q"))
		startHost(name, tok)
		t.Cleanup(func() { killQEMUs(hostDirs[name]) })
	}
	waitFor(t, "both hosts up", 30*time.Second, func() bool {
		hs := hostList(t, m)
		return hs["h1"].State == "up" && hs["h2"].State == "up"
	})
	if h := hostList(t, m)["h1"]; h.CPUs < 1 || h.MemoryBytes < 1<<30 || h.Accel == "" {
		t.Fatalf("host capacity not reported: %+v", h)
	}

	var v1, v2 api.VM
	json.Unmarshal([]byte(m.mustVigil("vm", "create", "v1", "--host", "h1", "--start", "--wait", "-o", "json")), &v1)
	json.Unmarshal([]byte(m.mustVigil("vm", "create", "v2", "--host", "h2", "--start", "--wait", "-o", "json")), &v2)
	if v1.Host != "h1" || v2.Host != "h2" || v1.Guest == nil || v2.Guest == nil {
		t.Fatalf("pinned vms: %+v / %+v", v1, v2)
	}
	if page := httpGet(t, "http://"+v2.Endpoint+"/"); !strings.Contains(page, v2.Guest.BootID) {
		t.Fatalf("endpoint of a vm on h2:\n%s", page)
	}
	if got := execOut(t, m, "v2", "hostname"); got != "v2" {
		t.Fatalf("exec through the manager to h2: %q", got)
	}

	// Placement that cannot fit, naming what is missing on each host.
	total := hostList(t, m)["h1"].MemoryBytes
	_, errs, code := m.vigil("vm", "create", "huge", "--memory", humanGiB(total))
	if code == 0 || !strings.Contains(errs, "no host can take") || !strings.Contains(errs, "h1 has") || !strings.Contains(errs, "h2 has") {
		t.Fatalf("unfit placement: exit %d %q", code, errs)
	}
	if _, errs, code := m.vigil("vm", "create", "x", "--host", "h9"); code == 0 || !strings.Contains(errs, "no host named h9") {
		t.Fatalf("pin to an unknown host: %q", errs)
	}

	// The host agent of h2 dies hard; its VM keeps running. Restarted
	// without a token (it kept its secret), it adopts the VM.
	hosts["h2"].kill()
	if !processAlive(v2.PID) {
		t.Fatal("the vm died with its host agent")
	}
	waitFor(t, "h2 to show down", 15*time.Second, func() bool { return hostList(t, m)["h2"].State == "down" })
	startHost("h2", "")
	waitFor(t, "h2 back", 30*time.Second, func() bool { return hostList(t, m)["h2"].State == "up" })
	waitFor(t, "v2 heartbeats after re-adoption", 20*time.Second, func() bool {
		v := showVM(t, m, "v2")
		return v.Guest != nil && v.Guest.Seq > v2.Guest.Seq
	})
	if v := showVM(t, m, "v2"); v.PID != v2.PID || v.Guest.BootID != v2.Guest.BootID || v.State != api.StateRunning {
		t.Fatalf("after the host agent restart: %+v", v)
	}

	m.mustVigil("vm", "delete", "v1")
	m.mustVigil("vm", "delete", "v2")
	waitFor(t, "qemu of v2 gone", 10*time.Second, func() bool { return !processAlive(v2.PID) })
}

// humanGiB is b rounded up to whole GiB, as a --memory value.
func humanGiB(b int64) string {
	return strconv.FormatInt((b+(1<<30)-1)>>30, 10) + "G"
}
