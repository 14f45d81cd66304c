package integration

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/hostnet"
)

// Network tests make bridges, taps and firewall rules: they run in a
// network namespace of their own, never in the machine's. inOwnNetNS runs
// the calling test again in a new namespace (as root) and reports whether
// the caller is that run; the outer run only relays its result.
const netnsEnv = "VIGIL_IT_NETNS"

func inOwnNetNS(t *testing.T) bool {
	t.Helper()
	if os.Getenv(netnsEnv) != "" {
		lo, err := netlink.LinkByName("lo")
		if err == nil {
			err = netlink.LinkSetUp(lo)
		}
		if err != nil {
			t.Fatalf("bring up lo in the test's namespace: %v", err)
		}
		return true
	}
	if os.Geteuid() != 0 {
		t.Skip("network tests need root (to make a network namespace of their own)")
	}
	cmd := exec.Command(os.Args[0], "-test.run", "^"+t.Name()+"$", "-test.v", "-test.count=1", "-test.timeout=30m")
	cmd.Env = append(os.Environ(), netnsEnv+"=1", "VIGIL_BIN="+binDir, "VIGIL_TEST_IMAGE="+imageDir)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET}
	err := cmd.Run()
	t.Logf("in its own network namespace:\n%s", out.String())
	if err != nil {
		t.Fatalf("%s in its own network namespace: %v", t.Name(), err)
	}
	if !strings.Contains(out.String(), "--- PASS: "+t.Name()) {
		t.Fatalf("%s did not pass in its own network namespace", t.Name())
	}
	return false
}

var inetRE = regexp.MustCompile(`inet (\d+\.\d+\.\d+\.\d+)/`)

// TestNetworks runs VMs on managed networks across two hosts (sharing one
// machine, so one bridge per network): addresses come from the manager and
// the hosts' DHCP, VMs of a network reach each other and their gateway,
// networks are isolated, spoofing is dropped, a published port is reached
// from another namespace, and addresses survive restart, suspend, live
// migration (a TCP stream stays open) and host failover. An idle guest
// with its agent stopped is never restarted (its kernel answers ARP); a
// hung one is.
func TestNetworks(t *testing.T) {
	needIntegration(t)
	if !inOwnNetNS(t) {
		return
	}
	c := startPoolCluster(t, "h1", "h2")
	m := c.m
	m.mustVigil("network", "create", "blue", "--subnet", "10.80.0.0/24", "--nat")
	m.mustVigil("network", "create", "red", "--subnet", "10.81.0.0/24")

	create := func(name, host string, args ...string) api.VM {
		t.Helper()
		var v api.VM
		out := m.mustVigil(append([]string{"vm", "create", name, "--host", host, "--start", "--wait", "-o", "json"}, args...)...)
		if err := json.Unmarshal([]byte(out), &v); err != nil || v.Guest == nil || len(v.NICs) != 1 {
			t.Fatalf("create %s: %v\n%s", name, err, out)
		}
		return v
	}
	a := create("a", "h1", "--network", "blue", "--publish", "18080:80")
	b := create("b", "h2", "--network", "blue,ip=10.80.0.50")
	red := create("c", "h1", "--network", "red")
	if a.NICs[0].IP != "10.80.0.2" || b.NICs[0].IP != "10.80.0.50" || red.NICs[0].IP != "10.81.0.2" || a.Endpoint != "10.80.0.2:80" {
		t.Fatalf("addresses: a %+v, b %+v, c %+v", a.NICs, b.NICs, red.NICs)
	}
	ipOf := func(vm string) string {
		t.Helper()
		out := m.mustVigil("vm", "exec", vm, "--", "ip", "-4", "addr", "show", "dev", "eth0")
		if mm := inetRE.FindStringSubmatch(out); mm != nil {
			return mm[1]
		}
		return ""
	}
	ping := func(vm string, args ...string) bool {
		_, _, code := m.vigil(append([]string{"vm", "exec", vm, "--", "ping", "-c", "2", "-W", "2"}, args...)...)
		return code == 0
	}
	if got := ipOf("a"); got != "10.80.0.2" {
		t.Fatalf("a's guest has address %q from DHCP, want 10.80.0.2", got)
	}

	t.Run("bad input", func(t *testing.T) {
		for _, tc := range []struct {
			args []string
			msg  string
		}{
			{[]string{"network", "create", "x", "--subnet", "10.80.0.0/16"}, "overlaps network blue"},
			{[]string{"vm", "create", "x", "--network", "blue,ip=10.99.0.5"}, "outside"},
			{[]string{"vm", "create", "x", "--network", "blue,ip=10.80.0.50"}, "already held by b"},
			{[]string{"network", "delete", "blue"}, "in use by"},
		} {
			_, errs, code := m.vigil(tc.args...)
			if code == 0 || !strings.Contains(errs, tc.msg) {
				t.Errorf("vigil %s: exit %d, %q; want an error saying %q", strings.Join(tc.args, " "), code, errs, tc.msg)
			}
		}
		m.mustVigil("network", "create", "lan", "--bridge", "br-missing")
		_, errs, code := m.vigil("vm", "create", "x", "--network", "lan", "--host", "h1", "--start")
		if code == 0 || !strings.Contains(errs, "does not exist on this host") {
			t.Errorf("a VM on a missing bridge: exit %d, %q", code, errs)
		}
		if _, err := netlink.LinkByName(hostnet.TapName("h1", "x", 0)); err == nil {
			t.Error("the failed start left its tap")
		}
		m.vigil("vm", "delete", "x")
		m.mustVigil("network", "delete", "lan")
	})

	t.Run("reach and isolation", func(t *testing.T) {
		if !ping("a", "10.80.0.50") {
			t.Error("a (on h1) does not reach b (on h2) on network blue")
		}
		if !ping("a", "10.80.0.1") {
			t.Error("a does not reach its gateway")
		}
		if ping("a", "10.81.0.2") {
			t.Error("a on network blue reaches c on network red")
		}
		if page := httpGet(t, "http://"+a.Endpoint+"/"); !strings.Contains(page, a.Guest.BootID) {
			t.Errorf("a's endpoint from the host:\n%s", page)
		}
	})

	t.Run("published port from another namespace", func(t *testing.T) {
		ns := fmt.Sprintf("vt-client-%d", os.Getpid())
		run := func(args ...string) {
			t.Helper()
			if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
				t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
			}
		}
		run("netns", "add", ns)
		t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
		run("link", "add", "vtc0", "type", "veth", "peer", "name", "vtc1", "netns", ns)
		run("addr", "add", "192.168.250.1/30", "dev", "vtc0")
		run("link", "set", "vtc0", "up")
		run("-n", ns, "addr", "add", "192.168.250.2/30", "dev", "vtc1")
		run("-n", ns, "link", "set", "vtc1", "up")
		run("-n", ns, "link", "set", "lo", "up")
		out, err := exec.Command("ip", "netns", "exec", ns, "curl", "-sS", "-m", "10", "http://192.168.250.1:18080/").CombinedOutput()
		if err != nil || !strings.Contains(string(out), a.Guest.BootID) {
			t.Fatalf("published port 18080 from another namespace: %v\n%s", err, out)
		}
	})

	t.Run("spoofed source dropped", func(t *testing.T) {
		m.mustVigil("vm", "exec", "a", "--", "ip", "addr", "add", "10.80.0.99/24", "dev", "eth0")
		if ping("a", "-I", "10.80.0.99", "10.80.0.50") {
			t.Error("a reached b with a spoofed source address")
		}
		m.mustVigil("vm", "exec", "a", "--", "ip", "addr", "del", "10.80.0.99/24", "dev", "eth0")
		if !ping("a", "10.80.0.50") {
			t.Error("a no longer reaches b with its own address")
		}
	})

	t.Run("address kept across restart and suspend", func(t *testing.T) {
		m.mustVigil("vm", "stop", "a")
		m.mustVigil("vm", "start", "a", "--wait")
		if got := ipOf("a"); got != "10.80.0.2" {
			t.Fatalf("after a restart a has %q", got)
		}
		m.mustVigil("vm", "pause", "a", "--to-disk")
		m.mustVigil("vm", "resume", "a")
		waitFor(t, "a's guest after resume", 30*time.Second, func() bool { v := showVM(t, m, "a"); return v.Guest != nil })
		if got := ipOf("a"); got != "10.80.0.2" || !ping("a", "10.80.0.50") {
			t.Fatalf("after suspend and resume a has %q", got)
		}
	})

	t.Run("tcp stream through live migration", func(t *testing.T) {
		m.mustVigil("vm", "exec", "a", "--background", "--", "nc", "-ll", "-p", "9000", "-e", "/bin/cat")
		var conn net.Conn
		waitFor(t, "a's echo server", 15*time.Second, func() bool {
			var err error
			conn, err = net.DialTimeout("tcp", "10.80.0.2:9000", time.Second)
			return err == nil
		})
		defer conn.Close()
		var (
			mu       sync.Mutex
			sent     uint64
			maxStall time.Duration
			readErr  error
		)
		stop := make(chan struct{})
		done := make(chan struct{})
		go func() { // writer: a counter every 20 ms
			for i := uint64(1); ; i++ {
				select {
				case <-stop:
					return
				case <-time.After(20 * time.Millisecond):
				}
				var b [8]byte
				binary.BigEndian.PutUint64(b[:], i)
				if _, err := conn.Write(b[:]); err != nil {
					return
				}
				mu.Lock()
				sent = i
				mu.Unlock()
			}
		}()
		var got uint64
		go func() { // reader: every counter back, in order
			defer close(done)
			last := time.Now()
			var b [8]byte
			for {
				conn.SetReadDeadline(time.Now().Add(30 * time.Second))
				if _, err := io.ReadFull(conn, b[:]); err != nil {
					mu.Lock()
					readErr = err
					mu.Unlock()
					return
				}
				now := time.Now()
				v := binary.BigEndian.Uint64(b[:])
				mu.Lock()
				if v != got+1 && readErr == nil {
					readErr = fmt.Errorf("got counter %d after %d", v, got)
				}
				got = v
				if d := now.Sub(last); d > maxStall {
					maxStall = d
				}
				last = now
				n, s := got, sent
				mu.Unlock()
				select {
				case <-stop:
					if n >= s {
						return
					}
				default:
				}
			}
		}()
		time.Sleep(2 * time.Second)
		m.mustVigil("vm", "migrate", "a", "--to", "h2")
		time.Sleep(3 * time.Second)
		close(stop)
		select {
		case <-done:
		case <-time.After(40 * time.Second):
			t.Fatal("the echo stream never caught up")
		}
		mu.Lock()
		defer mu.Unlock()
		if readErr != nil && !(got == sent && got > 0) {
			t.Fatalf("stream: %v (echoed %d of %d)", readErr, got, sent)
		}
		if got != sent || got < 100 {
			t.Fatalf("echoed %d of %d counters", got, sent)
		}
		t.Logf("tcp stream through live migration: %d counters, none lost; longest stall %v", got, maxStall.Round(time.Millisecond))
		if v := showVM(t, m, "a"); v.Host != "h2" || v.NICs[0].IP != "10.80.0.2" {
			t.Fatalf("after the migration: %+v", v)
		}
	})

	t.Run("idle guest with its agent stopped is not restarted", func(t *testing.T) {
		waitFor(t, "c past its grace period", 60*time.Second, func() bool {
			v := showVM(t, m, "c")
			return v.Guest != nil && v.Guest.UptimeSeconds > 31
		})
		m.mustVigil("vm", "fault", "c", "agent-stop")
		waitFor(t, "c's condition agent-unwell", 40*time.Second, func() bool { return showVM(t, m, "c").Condition == "agent-unwell" })
		time.Sleep(15 * time.Second) // well past the 10 s hang timeout
		var incs []api.Incident
		json.Unmarshal([]byte(m.mustVigil("vm", "incidents", "c", "-o", "json")), &incs)
		if len(incs) != 0 {
			t.Fatalf("an idle guest whose kernel answers ARP was judged: %+v", incs)
		}
		// A hung kernel does not answer: that one is restarted.
		m.mustVigil("vm", "restart", "c")
		waitFor(t, "c up again", 60*time.Second, func() bool {
			v := showVM(t, m, "c")
			return v.Guest != nil && v.Guest.UptimeSeconds > 31
		})
		m.mustVigil("vm", "fault", "c", "hang")
		waitFor(t, "c's hang detected and recovered", 90*time.Second, func() bool {
			json.Unmarshal([]byte(m.mustVigil("vm", "incidents", "c", "-o", "json")), &incs)
			return len(incs) == 1 && incs[0].Kind == "hang" && incs[0].RecoveredAt != nil
		})
	})

	t.Run("addresses kept across host failover", func(t *testing.T) {
		c.hosts["h2"].kill()
		killQEMUs(c.dirs["h2"])
		waitFor(t, "a and b back on h1", 90*time.Second, func() bool {
			va, vb := showVM(t, m, "a"), showVM(t, m, "b")
			return va.Host == "h1" && vb.Host == "h1" && va.Guest != nil && vb.Guest != nil
		})
		if ipOf("a") != "10.80.0.2" || ipOf("b") != "10.80.0.50" || !ping("a", "10.80.0.50") {
			t.Fatal("addresses changed with the failover")
		}
	})
}

// TestRealGuestNetwork boots the Debian image on a managed network: cloud-
// init's network-config gives it its reserved address (qemu-guest-agent
// reports it), the host reaches its service there, and with its agent
// stopped the idle guest is reported agent-unwell, never restarted: its
// kernel still answers ARP.
func TestRealGuestNetwork(t *testing.T) {
	needDebian(t)
	if !inOwnNetNS(t) {
		return
	}
	m := newDevAgent(t)
	m.mustVigil("network", "create", "blue", "--subnet", "10.80.0.0/24", "--nat")
	mustVigilFor(t, m, 5*time.Minute, "image", "import", "debian", debianImage)
	start := time.Now()
	var v api.VM
	out := mustVigilFor(t, m, 8*time.Minute, "vm", "create", "deb", "--image", "debian", "--network", "blue,ip=10.80.0.20",
		"--user-data", userData(t, "net1"), "--start", "--wait", "-o", "json")
	if err := json.Unmarshal([]byte(out), &v); err != nil || v.Guest == nil || v.Guest.Agent != "qemu-ga" || v.Endpoint != "10.80.0.20:80" {
		t.Fatalf("create --wait: %v\n%s", err, out)
	}
	v, _ = serving(t, m, "deb", "net1", 6*time.Minute)
	t.Logf("serving on its own address after %s", time.Since(start).Round(time.Millisecond))
	waitFor(t, "qemu-ga reporting the address", time.Minute, func() bool {
		v = showVM(t, m, "deb")
		return v.Guest != nil && slices.Contains(v.Guest.Addresses, "10.80.0.20/24")
	})
	if got := strings.TrimSpace(execOut(t, m, "deb", "ip -4 route show default")); !strings.Contains(got, "via 10.80.0.1") {
		t.Fatalf("the guest's default route: %q", got)
	}

	waitFor(t, "deb past its grace period", 2*time.Minute, func() bool {
		g := showVM(t, m, "deb").Guest
		return g != nil && g.UptimeSeconds > 31
	})
	m.mustVigil("vm", "fault", "deb", "agent-stop")
	waitFor(t, "deb agent-unwell", time.Minute, func() bool { return showVM(t, m, "deb").Condition == "agent-unwell" })
	time.Sleep(20 * time.Second) // twice the hang timeout
	var incs []api.Incident
	json.Unmarshal([]byte(m.mustVigil("vm", "incidents", "deb", "-o", "json")), &incs)
	if len(incs) != 0 {
		t.Fatalf("an idle Debian guest with its qemu-ga stopped was judged: %+v", incs)
	}
	if fetch("http://10.80.0.20/") != "net1" {
		t.Fatal("the guest stopped serving")
	}
}
