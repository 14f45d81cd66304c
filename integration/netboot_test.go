package integration

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/pki"
	"github.com/vigil-project/vigil/internal/qemu/qmp"
)

const bootMachineUUID = "6f1c2d3e-0000-4000-8000-0000000000b1"

// bootMachine is a QEMU machine standing in for bare metal: no kernel of
// its own, an empty disk, a NIC on the boot bridge whose ROM (iPXE) boots
// from the network.
type bootMachine struct {
	cmd    *exec.Cmd
	serial string
	qmp    string
	disk   string
}

func startBootMachine(t *testing.T, dir, tap, mac string) *bootMachine {
	t.Helper()
	bm := &bootMachine{serial: filepath.Join(dir, "serial.log"), qmp: filepath.Join(dir, "qmp.sock"), disk: filepath.Join(dir, "disk.raw")}
	if err := os.WriteFile(bm.disk, make([]byte, 16<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	bm.cmd = exec.Command("qemu-system-x86_64", "-machine", "q35,accel=tcg", "-cpu", "max", "-m", "2048", "-smp", "2",
		"-nodefaults", "-display", "none", "-uuid", bootMachineUUID, "-boot", "n",
		"-serial", "file:"+bm.serial, "-qmp", "unix:"+bm.qmp+",server=on,wait=off",
		"-drive", "file="+bm.disk+",format=raw,if=virtio",
		"-netdev", "tap,id=n0,ifname="+tap+",script=no,downscript=no", "-device", "virtio-net-pci,netdev=n0,mac="+mac)
	var out bytes.Buffer
	bm.cmd.Stdout, bm.cmd.Stderr = &out, &out
	if err := bm.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		bm.cmd.Process.Kill()
		bm.cmd.Wait()
		if t.Failed() {
			b, _ := os.ReadFile(bm.serial)
			t.Logf("boot machine: %s\nits console:\n%s", out.String(), lastLines(string(b), 40))
		}
	})
	return bm
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

func (bm *bootMachine) console() string {
	b, _ := os.ReadFile(bm.serial)
	return string(b)
}

// reset presses the machine's reset button.
func (bm *bootMachine) reset(t *testing.T) {
	t.Helper()
	mon, err := qmp.Dial(t.Context(), bm.qmp)
	if err != nil {
		t.Fatal(err)
	}
	defer mon.Close()
	if err := mon.Run(t.Context(), "system_reset", nil, nil); err != nil {
		t.Fatal(err)
	}
}

// bootLab makes the boot network (bridge br-boot, 10.77.0.1/24, and the
// bare-metal machine's tap on it), starts a manager with its boot service
// there (with agentArgs), and builds a host image with the cluster's CA as
// profile "default". It returns the manager, the image and the tap.
func bootLab(t *testing.T, agentArgs ...string) (*devAgent, string, *netlink.Tuntap) {
	t.Helper()
	tap := bootNet(t)
	m := &devAgent{t: t, dataDir: shortTempDir(t), addr: "10.77.0.1:7070"}
	startProc(t, append([]string{"agent", "--manager", "--listen", m.addr, "--data-dir", m.dataDir, "--boot-interface", "br-boot", "--log-level", "debug"}, agentArgs...)...)
	waitFor(t, "manager", 60*time.Second, func() bool {
		_, _, code := m.vigil("host", "list")
		return code == 0
	})
	digest := buildHostImage(t, m)
	m.mustVigil("boot", "profile", "create", "default", "--image", digest)
	return m, digest, tap
}

// bootNet makes the boot network: bridge br-boot (10.77.0.1/24) and the
// bare-metal machine's tap on it.
func bootNet(t *testing.T) *netlink.Tuntap {
	t.Helper()
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "br-boot"}}
	tap := &netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: "tap-metal"}, Mode: netlink.TUNTAP_MODE_TAP}
	for _, step := range []func() error{
		func() error { return netlink.LinkAdd(br) },
		func() error { a, _ := netlink.ParseAddr("10.77.0.1/24"); return netlink.AddrAdd(br, a) },
		func() error { return netlink.LinkSetUp(br) },
		func() error { return netlink.LinkAdd(tap) },
		func() error { return netlink.LinkSetMaster(tap, br) },
		func() error { return netlink.LinkSetUp(tap) },
	} {
		if err := step(); err != nil {
			t.Fatalf("boot network: %v", err)
		}
	}
	return tap
}

// buildHostImage builds a host image with m's cluster CA into m's data dir
// (the kernel package comes from the guest image's download cache).
func buildHostImage(t *testing.T, m *devAgent) string {
	t.Helper()
	cache := filepath.Join(m.dataDir, "images", "cache")
	os.MkdirAll(cache, 0o755)
	debs, _ := filepath.Glob(filepath.Join(filepath.Dir(imageDir), "cache", "*.deb"))
	for _, d := range debs {
		if b, err := os.ReadFile(d); err == nil {
			os.WriteFile(filepath.Join(cache, filepath.Base(d)), b, 0o644)
		}
	}
	t0 := time.Now()
	digest := strings.TrimSpace(m.mustVigil("boot", "image", "build", "--data-dir", m.dataDir, "--guest-image", imageDir, "-q"))
	t.Logf("host image %s built in %s", digest, time.Since(t0).Round(time.Millisecond))
	return digest
}

// TestNetworkBoot boots a machine with an empty disk from the network:
// DHCP and iPXE from a manager's boot service, the host image over HTTP.
// Unknown, it waits quarantined with no credentials; admitted, it gets its
// signed configuration and joins as h3; reset, it boots again, fetches its
// configuration again and rejoins as h3, and its disk was never written.
func TestNetworkBoot(t *testing.T) {
	needIntegration(t)
	if !inOwnNetNS(t) {
		return
	}
	m, digest, tap := bootLab(t)

	const mac = "52:54:00:be:ee:01"
	machine := func() api.BootMachine {
		var ms []api.BootMachine
		json.Unmarshal([]byte(m.mustVigil("boot", "machines", "-o", "json")), &ms)
		for _, x := range ms {
			if x.MAC == mac {
				return x
			}
		}
		return api.BootMachine{}
	}
	// A rule for other machines: this one stays quarantined.
	m.mustVigil("boot", "rule", "create", "dell", "--vendor", "Dell Inc.", "--profile", "default")
	bm := startBootMachine(t, shortTempDir(t), tap.Name, mac)
	powerOn := time.Now()

	// Unknown: it boots, asks, and waits without credentials.
	waitFor(t, "the machine waiting to be admitted", 3*time.Minute, func() bool {
		return strings.Contains(bm.console(), "waiting to be admitted")
	})
	t.Logf("power-on to the first configuration request: %s", time.Since(powerOn).Round(time.Millisecond))
	// iPXE said what the machine is (SMBIOS), for the rules.
	if x := machine(); x.State != api.MachineQuarantined || x.Boots != 0 || x.IP == "" || x.Vendor != "QEMU" || x.UUID != bootMachineUUID {
		t.Fatalf("unknown machine: %+v", x)
	}
	if _, ok := hostList(t, m)["h3"]; ok {
		t.Fatal("a quarantined machine joined")
	}

	// Admitted by a rule on its UUID: at its next request it joins.
	admitted := time.Now()
	m.mustVigil("boot", "rule", "create", "h3", "--uuid", bootMachineUUID, "--profile", "default", "--host-name", "h3")
	waitFor(t, "h3 up", 90*time.Second, func() bool { return hostList(t, m)["h3"].State == "up" })
	t.Logf("admission to host up: %s", time.Since(admitted).Round(time.Millisecond))
	first := machine()
	if first.State != api.MachineAdmitted || first.Rule != "h3" || first.Boots != 1 || !strings.HasPrefix(first.LastConfig, "sha256:") || first.LastImage != digest {
		t.Fatalf("after joining: %+v", first)
	}

	var shown struct {
		Name string           `json:"name"`
		Boot *api.BootMachine `json:"boot"`
	}
	json.Unmarshal([]byte(m.mustVigil("host", "show", "h3", "-o", "json")), &shown)
	if shown.Name != "h3" || shown.Boot == nil || shown.Boot.LastImage != digest || shown.Boot.LastConfig != first.LastConfig {
		t.Fatalf("vigil host show h3: %+v", shown)
	}

	// Reset: it boots again from the network, is configured again, and
	// comes back as h3.
	bm.reset(t)
	reset := time.Now()
	waitFor(t, "h3 back after a reset", 3*time.Minute, func() bool {
		x := machine()
		return x.Boots == 2 && hostList(t, m)["h3"].State == "up"
	})
	t.Logf("reset to host up again: %s", time.Since(reset).Round(time.Millisecond))
	if again := machine(); again.LastConfig == first.LastConfig {
		t.Fatal("the second boot was given the first boot's configuration (and join token)")
	}
	// Rollouts: to a new image (h3 is drained, reset, back on it, the
	// profile then names it), then to a broken one (built with another
	// cluster's CA, so the host refuses every configuration): h3 does not
	// come back within the timeout, is put back on the image it ran, and
	// the rollout says so.
	m.mustVigil("boot", "power", mac, "--qmp", bm.qmp)
	other := filepath.Join(shortTempDir(t), "vigil")
	self, _ := os.ReadFile(filepath.Join(binDir, "vigil"))
	os.WriteFile(other, append(self, []byte("another build")...), 0o755) // another digest, same program
	digestB := strings.TrimSpace(m.mustVigil("boot", "image", "build", "--data-dir", m.dataDir, "--guest-image", imageDir, "--vigil", other, "-q"))
	if digestB == digest {
		t.Fatal("the second image has the first one's digest")
	}
	rollout := func(image, timeout string) (api.BootRollout, int) {
		out, _, code := m.vigilFor(5*time.Minute, "boot", "rollout", "default", "--image", image, "--timeout", timeout, "--wait", "-o", "json")
		var ro api.BootRollout
		json.Unmarshal([]byte(out), &ro)
		return ro, code
	}
	t0 := time.Now()
	ro, code := rollout(digestB, "3m")
	if code != 0 || ro.State != api.RolloutSucceeded || ro.Hosts[0].State != "done" {
		t.Fatalf("rollout to a new image: exit %d, %+v", code, ro)
	}
	t.Logf("rollout of one host to a new image: %s", time.Since(t0).Round(time.Millisecond))
	if x := machine(); x.LastImage != digestB || x.Boots != 3 {
		t.Fatalf("after the rollout: %+v", x)
	}
	otherCA := filepath.Join(shortTempDir(t), "ca.pem")
	ca, _, err := pki.NewCA("another")
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(otherCA, ca.CertPEM, 0o644)
	digestC := strings.TrimSpace(m.mustVigil("boot", "image", "build", "--data-dir", m.dataDir, "--guest-image", imageDir, "--ca", otherCA, "-q"))
	t0 = time.Now()
	ro, code = rollout(digestC, "60s")
	if code == 0 || ro.State != api.RolloutRolledBack || ro.Hosts[0].State != "rolled-back" {
		t.Fatalf("rollout to a broken image: exit %d, %+v", code, ro)
	}
	t.Logf("rollout to a broken image, rolled back: %s (%s)", time.Since(t0).Round(time.Millisecond), ro.Message)
	waitFor(t, "h3 back on the image it ran", 2*time.Minute, func() bool {
		x := machine()
		return x.LastImage == digestB && hostList(t, m)["h3"].State == "up"
	})
	var profiles []api.BootProfile
	json.Unmarshal([]byte(m.mustVigil("boot", "profile", "list", "-o", "json")), &profiles)
	if len(profiles) != 1 || profiles[0].Image != digestB {
		t.Fatalf("profile after the rolled-back rollout: %+v", profiles)
	}

	// Nothing was written to the machine's disk.
	b, err := os.ReadFile(bm.disk)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b, make([]byte, len(b))) {
		t.Fatal("the host wrote to its disk")
	}
}

// TestNetworkBootProxyDHCP boots a machine on a network whose own DHCP
// server (busybox udhcpd, on "another machine": a veth on the bridge)
// gives the addresses: the boot service answers iPXE with where to boot
// from only (ProxyDHCP), and a rule on the machine's MAC admits it.
func TestNetworkBootProxyDHCP(t *testing.T) {
	needIntegration(t)
	if !inOwnNetNS(t) {
		return
	}
	m, digest, tap := bootLab(t, "--boot-proxy-dhcp")
	// The network's DHCP server, with a range of its own.
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "dhcp0"}, PeerName: "dhcp1"}
	if err := netlink.LinkAdd(veth); err != nil {
		t.Fatal(err)
	}
	br, _ := netlink.LinkByName("br-boot")
	peer, _ := netlink.LinkByName("dhcp1")
	addr, _ := netlink.ParseAddr("10.77.0.2/24")
	for _, err := range []error{netlink.LinkSetMaster(veth, br), netlink.LinkSetUp(veth), netlink.AddrAdd(peer, addr), netlink.LinkSetUp(peer)} {
		if err != nil {
			t.Fatal(err)
		}
	}
	dir := shortTempDir(t)
	conf := filepath.Join(dir, "udhcpd.conf")
	os.WriteFile(conf, []byte(fmt.Sprintf("interface dhcp1\nstart 10.77.0.50\nend 10.77.0.60\noption subnet 255.255.255.0\noption lease 3600\nlease_file %s/leases\npidfile %s/pid\n", dir, dir)), 0o644)
	os.WriteFile(filepath.Join(dir, "leases"), nil, 0o644)
	udhcpd := exec.Command("busybox", "udhcpd", "-f", conf)
	var udhcpdOut bytes.Buffer
	udhcpd.Stdout, udhcpd.Stderr = &udhcpdOut, &udhcpdOut
	if err := udhcpd.Start(); err != nil {
		t.Fatalf("busybox udhcpd (package busybox-static): %v", err)
	}
	t.Cleanup(func() {
		udhcpd.Process.Kill()
		udhcpd.Wait()
		if t.Failed() {
			t.Logf("udhcpd:\n%s", udhcpdOut.String())
		}
	})

	const mac = "52:54:00:be:ee:04"
	m.mustVigil("boot", "rule", "create", "h4", "--mac", mac, "--profile", "default", "--host-name", "h4")
	bm := startBootMachine(t, shortTempDir(t), tap.Name, mac)
	powerOn := time.Now()
	waitFor(t, "h4 up", 3*time.Minute, func() bool { return hostList(t, m)["h4"].State == "up" })
	t.Logf("power-on to host up (proxydhcp): %s", time.Since(powerOn).Round(time.Millisecond))
	var ms []api.BootMachine
	json.Unmarshal([]byte(m.mustVigil("boot", "machines", "-o", "json")), &ms)
	if len(ms) != 1 || ms[0].Rule != "h4" || ms[0].LastImage != digest || ms[0].Boots != 1 {
		t.Fatalf("machines: %+v", ms)
	}
	// Its address is the network server's, not one of the boot service's.
	ip, err := netip.ParseAddr(ms[0].IP)
	if err != nil || ip.Less(netip.MustParseAddr("10.77.0.50")) || netip.MustParseAddr("10.77.0.60").Less(ip) {
		t.Fatalf("the machine's address %q is not from the network's dhcp server (10.77.0.50-60)", ms[0].IP)
	}
	if !strings.Contains(bm.console(), "dhcp bound eth0 "+ip.String()) {
		t.Fatalf("the booted host did not take its address from the network's server:\n%s", lastLines(bm.console(), 20))
	}
}

// TestBootServiceAlone runs the boot service as its own process (vigil
// agent --boot: DHCP needs root, the manager need not), on the manager's
// store through its embedded etcd's socket, serving a copy of the host
// image: a machine boots from it and joins the manager.
func TestBootServiceAlone(t *testing.T) {
	needIntegration(t)
	if !inOwnNetNS(t) {
		return
	}
	tap := bootNet(t)
	m := &devAgent{t: t, dataDir: shortTempDir(t), addr: "10.77.0.1:7070"}
	startProc(t, "agent", "--manager", "--listen", m.addr, "--data-dir", m.dataDir, "--log-level", "debug")
	waitFor(t, "manager", 60*time.Second, func() bool {
		_, _, code := m.vigil("host", "list")
		return code == 0
	})
	digest := buildHostImage(t, m)
	m.mustVigil("boot", "profile", "create", "default", "--image", digest)
	// The boot service's own data dir holds a copy of the image (as an
	// operator would copy it to the machine that runs the service).
	bootDir := shortTempDir(t)
	images := filepath.Join(bootDir, "boot", "images")
	os.MkdirAll(images, 0o755)
	hex := strings.TrimPrefix(digest, "sha256:")
	if out, err := exec.Command("cp", "-a", filepath.Join(m.dataDir, "boot", "images", hex), images).CombinedOutput(); err != nil {
		t.Fatalf("copy the image: %v: %s", err, out)
	}
	// Refused without what it needs, with the reason.
	if _, stderr, code := m.vigil("agent", "--boot", "--boot-interface", "br-boot", "--data-dir", bootDir); code == 0 || !strings.Contains(stderr, "--etcd-endpoints") {
		t.Fatalf("--boot without a store: exit %d: %s", code, stderr)
	}
	startProc(t, "agent", "--boot", "--etcd-endpoints", "unix://"+filepath.Join(m.dataDir, "etcd", "client.sock"),
		"--boot-interface", "br-boot", "--boot-manager-url", "https://"+m.addr, "--data-dir", bootDir, "--log-level", "debug")

	const mac = "52:54:00:be:ee:05"
	m.mustVigil("boot", "rule", "create", "h5", "--mac", mac, "--profile", "default", "--host-name", "h5")
	startBootMachine(t, shortTempDir(t), tap.Name, mac)
	powerOn := time.Now()
	waitFor(t, "h5 up", 3*time.Minute, func() bool { return hostList(t, m)["h5"].State == "up" })
	t.Logf("power-on to host up (boot service alone): %s", time.Since(powerOn).Round(time.Millisecond))
	var ms []api.BootMachine
	json.Unmarshal([]byte(m.mustVigil("boot", "machines", "-o", "json")), &ms)
	if len(ms) != 1 || ms[0].Rule != "h5" || ms[0].LastImage != digest || ms[0].Boots != 1 {
		t.Fatalf("machines: %+v", ms)
	}
}
