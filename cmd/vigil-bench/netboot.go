package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv4"
	"github.com/vishvananda/netlink"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/client"
)

// netboot measures stateless hosts: power-on to registered, split by
// stage, against the same image booted directly from a kernel and
// initramfs given to QEMU (no network boot); and 50 simulated boot
// clients at once against one alone. It runs in a network namespace of
// its own (a child run, as the network section).
func (b *bench) netboot(ctx context.Context) ([]row, error) {
	return b.inOwnNetNS(ctx, "netboot")
}

const (
	bootBridge = "br-nb"
	bootIP     = "10.78.0.1"
)

func (b *bench) netbootInner(ctx context.Context) ([]row, error) {
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: bootBridge}}
	if err := netlink.LinkAdd(br); err != nil {
		return nil, err
	}
	a, _ := netlink.ParseAddr(bootIP + "/24")
	if err := netlink.AddrAdd(br, a); err != nil {
		return nil, err
	}
	if err := netlink.LinkSetUp(br); err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "vnb")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	bin := filepath.Join(os.Getenv("VIGIL_BIN"), "vigil")
	mdir := filepath.Join(dir, "m")
	mgr := exec.CommandContext(ctx, bin, "agent", "--manager", "--listen", bootIP+":7070", "--data-dir", mdir, "--boot-interface", bootBridge)
	mlog, _ := os.Create(filepath.Join(dir, "manager.log"))
	mgr.Stdout, mgr.Stderr = mlog, mlog
	if err := mgr.Start(); err != nil {
		return nil, err
	}
	defer func() { mgr.Process.Kill(); mgr.Wait() }()
	var c *client.Client
	for t0 := time.Now(); ; time.Sleep(200 * time.Millisecond) {
		if _, err := os.Stat(filepath.Join(mdir, "client.yaml")); err == nil {
			c = clientFor(mdir)
			if _, err := c.BootProfiles(ctx); err == nil {
				break
			}
		}
		if time.Since(t0) > time.Minute {
			return nil, errors.New("the manager did not come up")
		}
	}
	// The host image, with this cluster's CA; the kernel package from the
	// guest image's download cache.
	cache := filepath.Join(mdir, "images", "cache")
	os.MkdirAll(cache, 0o755)
	debs, _ := filepath.Glob(filepath.Join(filepath.Dir(os.Getenv("VIGIL_TEST_IMAGE")), "cache", "*.deb"))
	for _, d := range debs {
		exec.Command("cp", d, cache).Run()
	}
	out, err := exec.CommandContext(ctx, bin, "--config", filepath.Join(mdir, "client.yaml"), "boot", "image", "build",
		"--data-dir", mdir, "--guest-image", os.Getenv("VIGIL_TEST_IMAGE"), "-q").CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("build the host image: %v: %s", err, out)
	}
	digest := strings.TrimSpace(string(out))
	if _, err := c.SetBootProfile(ctx, api.BootProfile{Name: "default", Image: digest}); err != nil {
		return nil, err
	}
	img := filepath.Join(mdir, "boot", "images", strings.TrimPrefix(digest, "sha256:"))
	st, _ := os.Stat(filepath.Join(img, "initrd.img"))
	kst, _ := os.Stat(filepath.Join(img, "vmlinuz"))

	tap := &netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: "tap-nb"}, Mode: netlink.TUNTAP_MODE_TAP}
	if err := netlink.LinkAdd(tap); err != nil {
		return nil, err
	}
	if err := netlink.LinkSetMaster(tap, br); err != nil {
		return nil, err
	}
	if err := netlink.LinkSetUp(tap); err != nil {
		return nil, err
	}

	var rows []row
	var pxe, direct []time.Duration
	stage := map[string][]time.Duration{}
	stageNames := []string{"firmware", "dhcp", "transfer", "kernel", "config", "join"}
	for i := 0; i < b.runs; i++ {
		for _, network := range []bool{true, false} {
			side := map[bool]int{true: 1, false: 2}[network]
			mac := fmt.Sprintf("52:54:00:b0:%02x:%02x", i, side)
			host := fmt.Sprintf("nb%d-%d", i, side)
			if _, err := c.AdmitMachine(ctx, mac, api.BootAdmitRequest{Profile: "default", HostName: host}); err != nil {
				return rows, err
			}
			on, up, err := bootOnce(ctx, c, dir, tap.Name, mac, host, network, img, digest)
			if err != nil {
				return rows, err
			}
			if !network {
				direct = append(direct, up.Sub(on))
				continue
			}
			pxe = append(pxe, up.Sub(on))
			ms, err := c.BootMachines(ctx)
			if err != nil {
				return rows, err
			}
			for _, m := range ms {
				if s := m.LastBoot; m.MAC == mac && s != nil {
					for k, d := range map[string]time.Duration{"firmware": s.DHCP.Sub(on), "dhcp": s.Script.Sub(s.DHCP),
						"transfer": s.Loaded.Sub(s.Script), "kernel": s.HostUp.Sub(s.Loaded), "config": s.Configured.Sub(s.HostUp),
						"join": up.Sub(s.Configured)} {
						stage[k] = append(stage[k], d)
					}
				}
			}
		}
	}
	secs := func(d time.Duration) string { return fmt.Sprintf("%.1f s", d.Seconds()) }
	rows = append(rows, versus(fmt.Sprintf("Network boot: power-on → host registered (a 2 GiB TCG machine with an empty disk; host image %.0f MiB; %d runs)",
		float64(st.Size()+kst.Size())/(1<<20), len(pxe)), pxe, direct, secs,
		"the same machine booting the same kernel and initramfs given to QEMU directly, no network boot, to the same registration",
		"target ≤ 10 s under TCG"))
	var split []string
	for _, k := range stageNames {
		if len(stage[k]) > 0 {
			split = append(split, fmt.Sprintf("%s p50 %.1f s", k, p(stage[k], 50).Seconds()))
		}
	}
	rows = append(rows, row{what: "Network boot, by stage (p50 of each): firmware (BIOS, iPXE up) → DHCP and script → kernel and initramfs over HTTP → kernel boot and init → configuration fetched and verified → joined and registered",
		vigil: strings.Join(split, ", "), baseline: "-", ratio: "-", note: "stage times from the boot service's records of each boot (same clock)"})
	if rowsOut != "" {
		writeRows(rowsOut, rows)
	}

	// 50 machines booting at once, as the boot service sees them: DHCP
	// through the bridge, then the script, kernel and initramfs over HTTP.
	pid := mgr.Process.Pid
	var one, fifty []time.Duration
	var cpu []float64
	// The same machines every round, as machines rebooting (made-up new
	// ones would use up the address range: leases last an hour).
	for i := 0; i < b.runs; i++ {
		d, err := simulateBoots(ctx, 1, 0)
		if err != nil {
			return rows, err
		}
		one = append(one, d...)
		c0 := cpuSeconds(pid)
		t0 := time.Now()
		d, err = simulateBoots(ctx, 50, 1)
		if err != nil {
			return rows, err
		}
		cpu = append(cpu, (cpuSeconds(pid)-c0)/time.Since(t0).Seconds()*100)
		fifty = append(fifty, p(d, 100))
	}
	rows = append(rows, versus(fmt.Sprintf("50 simulated machines booting at once (DHCP through the bridge, then script, kernel and initramfs over HTTP, %.0f MiB each): the slowest (%d rounds)",
		float64(st.Size()+kst.Size())/(1<<20), len(fifty)), fifty, one, ms, "one machine alone",
		fmt.Sprintf("the boot service's CPU during the 50: p50 %.0f%% of one core", pF(cpu, 50))))
	return rows, nil
}

// bootOnce powers on a machine (network boot, or the image given to QEMU
// directly) and returns when it was powered on and when its host
// registered; the machine is turned off again.
func bootOnce(ctx context.Context, c *client.Client, dir, tap, mac, host string, network bool, img, digest string) (time.Time, time.Time, error) {
	args := []string{"-machine", "q35,accel=tcg", "-cpu", "max", "-m", "2048", "-smp", "2", "-nodefaults", "-display", "none",
		"-serial", "file:" + filepath.Join(dir, host+".log"),
		"-netdev", "tap,id=n0,ifname=" + tap + ",script=no,downscript=no", "-device", "virtio-net-pci,netdev=n0,mac=" + mac}
	if network {
		args = append(args, "-boot", "n")
	} else {
		args = append(args, "-kernel", filepath.Join(img, "vmlinuz"), "-initrd", filepath.Join(img, "initrd.img"),
			"-append", fmt.Sprintf("console=ttyS0 loglevel=4 vigil.boot=https://%s:8068 vigil.bootmac=%s vigil.image=%s vigil.kernel=http://%s:8067/images/%s/vmlinuz",
				bootIP, mac, digest, bootIP, strings.TrimPrefix(digest, "sha256:")))
	}
	cmd := exec.CommandContext(ctx, "qemu-system-x86_64", args...)
	on := time.Now()
	if err := cmd.Start(); err != nil {
		return on, on, err
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	for time.Since(on) < 3*time.Minute {
		hs, err := c.Hosts(ctx)
		if err == nil {
			for _, h := range hs {
				if h.Name == host && h.State == "up" {
					return on, time.Now(), nil
				}
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	log, _ := os.ReadFile(filepath.Join(dir, host+".log"))
	return on, on, fmt.Errorf("host %s did not register within 3 minutes; its console: %s", host, lastLines(string(log), 10))
}

// cpuSeconds is the CPU time process pid used so far.
func cpuSeconds(pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	if len(f) < 13 {
		return 0
	}
	u, _ := strconv.ParseFloat(f[11], 64)
	k, _ := strconv.ParseFloat(f[12], 64)
	return (u + k) / 100 // clock ticks
}

// simulateBoots runs n simulated iPXE clients at once (MACs numbered from
// first): DHCP from a veth on the boot bridge, then the script and the
// files it names. It returns each client's time to the end of its
// initramfs.
func simulateBoots(ctx context.Context, n, first int) ([]time.Duration, error) {
	conn, err := clientSocket()
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	t0 := time.Now()
	type lease struct {
		xid  dhcpv4.TransactionID
		mac  net.HardwareAddr
		file string
		// next is what the client sends again if no answer comes (a real
		// client asks again, the boot service drops what it cannot take).
		next  []byte
		acked bool
	}
	leases := map[dhcpv4.TransactionID]*lease{}
	var mu sync.Mutex
	done := make(chan *lease, n)
	go func() {
		buf := make([]byte, 1500)
		for {
			k, _, err := conn.ReadFrom(buf)
			if err != nil {
				return
			}
			m, err := dhcpv4.FromBytes(buf[:k])
			if err != nil {
				continue
			}
			mu.Lock()
			l := leases[m.TransactionID]
			mu.Unlock()
			if l == nil {
				continue
			}
			switch m.MessageType() {
			case dhcpv4.MessageTypeOffer:
				req, err := dhcpv4.NewRequestFromOffer(m, dhcpv4.WithUserClass("iPXE", false))
				if err == nil {
					req.TransactionID = l.xid
					mu.Lock()
					l.next = req.ToBytes()
					mu.Unlock()
					conn.WriteTo(req.ToBytes(), &net.UDPAddr{IP: net.IPv4bcast, Port: 67})
				}
			case dhcpv4.MessageTypeAck:
				mu.Lock()
				first := !l.acked
				l.acked, l.file = true, m.BootFileNameOption()
				mu.Unlock()
				if first {
					done <- l
				}
			}
		}
	}()
	for i := 0; i < n; i++ {
		mac := net.HardwareAddr{0x52, 0x54, 0x00, 0xc0, byte((first + i) >> 8), byte(first + i)}
		d, err := dhcpv4.NewDiscovery(mac, dhcpv4.WithUserClass("iPXE", false))
		if err != nil {
			return nil, err
		}
		mu.Lock()
		leases[d.TransactionID] = &lease{xid: d.TransactionID, mac: mac, next: d.ToBytes()}
		mu.Unlock()
		if _, err := conn.WriteTo(d.ToBytes(), &net.UDPAddr{IP: net.IPv4bcast, Port: 67}); err != nil {
			return nil, err
		}
	}
	stopRetry := make(chan struct{})
	defer close(stopRetry)
	go func() {
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case <-stopRetry:
				return
			case <-t.C:
			}
			mu.Lock()
			var again [][]byte
			for _, l := range leases {
				if !l.acked {
					again = append(again, l.next)
				}
			}
			mu.Unlock()
			for _, b := range again {
				conn.WriteTo(b, &net.UDPAddr{IP: net.IPv4bcast, Port: 67})
			}
		}
	}()
	var wg sync.WaitGroup
	times := make(chan time.Duration, n)
	errs := make(chan error, n)
	timeout := time.After(2 * time.Minute)
	for got := 0; got < n; got++ {
		var l *lease
		select {
		case l = <-done:
		case <-timeout:
			return nil, fmt.Errorf("%d of %d simulated clients got no DHCP answer", n-got, n)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			mu.Lock()
			file := l.file
			mu.Unlock()
			if err := fetchBoot(ctx, file); err != nil {
				errs <- err
				return
			}
			times <- time.Since(t0)
		}()
	}
	wg.Wait()
	close(times)
	select {
	case err := <-errs:
		return nil, err
	default:
	}
	var out []time.Duration
	for d := range times {
		out = append(out, d)
	}
	return out, nil
}

// fetchBoot does what iPXE does with a boot file URL: the script, then
// the kernel and initramfs it names.
func fetchBoot(ctx context.Context, url string) error {
	get := func(u string) ([]byte, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
		if err != nil {
			return nil, err
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return nil, err
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return nil, fmt.Errorf("GET %s: %s", u, resp.Status)
		}
		if strings.Contains(u, "/images/") {
			_, err = io.Copy(io.Discard, resp.Body)
			return nil, err
		}
		return io.ReadAll(resp.Body)
	}
	script, err := get(url)
	if err != nil {
		return err
	}
	// The first script chains to the real one with iPXE's SMBIOS
	// settings, as iPXE expands them (here: a made-up machine's).
	if f := strings.Fields(string(script)); len(f) == 3 && f[1] == "chain" {
		r := strings.NewReplacer("${uuid}", "", "${manufacturer:uristring}", "Simulated", "${product:uristring}", "bench")
		if script, err = get(r.Replace(f[2])); err != nil {
			return err
		}
	}
	for _, line := range strings.Split(string(script), "\n") {
		f := strings.Fields(line)
		if len(f) >= 2 && (f[0] == "kernel" || f[0] == "initrd") {
			if _, err := get(f[1]); err != nil {
				return err
			}
		}
	}
	return nil
}

// clientSocket is a DHCP client's socket on a veth whose peer is on the
// boot bridge (made on first use).
func clientSocket() (net.PacketConn, error) {
	if _, err := netlink.LinkByName("nb-client"); err != nil {
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "nb-client"}, PeerName: "nb-client-br"}
		if err := netlink.LinkAdd(veth); err != nil {
			return nil, err
		}
		peer, err := netlink.LinkByName("nb-client-br")
		if err != nil {
			return nil, err
		}
		br, err := netlink.LinkByName(bootBridge)
		if err != nil {
			return nil, err
		}
		if err := netlink.LinkSetMaster(peer, br); err != nil {
			return nil, err
		}
		for _, l := range []netlink.Link{veth, peer} {
			if err := netlink.LinkSetUp(l); err != nil {
				return nil, err
			}
		}
		// The boot service answers from an address of this namespace:
		// taken in on the client's end, it would be a martian.
		// Both ways: the simulated clients' UDP socket, with no address of
		// its own, sends from the namespace's address too.
		for _, f := range []string{"nb-client/accept_local", "nb-client/rp_filter", bootBridge + "/accept_local", bootBridge + "/rp_filter", "all/rp_filter"} {
			v := "0"
			if strings.HasSuffix(f, "accept_local") {
				v = "1"
			}
			if err := os.WriteFile("/proc/sys/net/ipv4/conf/"+f, []byte(v), 0o644); err != nil {
				return nil, err
			}
		}
		time.Sleep(time.Second) // the bridge port forwards after a moment
	}
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			if serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_BROADCAST, 1); serr != nil {
				return
			}
			if serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 1); serr != nil {
				return
			}
			serr = syscall.BindToDevice(int(fd), "nb-client")
		})
		if err != nil {
			return err
		}
		return serr
	}}
	return lc.ListenPacket(context.Background(), "udp4", ":68")
}
