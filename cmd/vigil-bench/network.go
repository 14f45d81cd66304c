package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/cloudinit"
	"github.com/vigil-project/vigil/internal/qemu"
	"github.com/vigil-project/vigil/internal/qga"
)

// The network section makes bridges, taps and firewall rules: it runs in a
// network namespace of its own. network re-executes this binary there
// (-rows FILE, section network-inner) and reads back its rows.

// rowsOut, when set (-rows), is where a child run writes its rows as JSON
// instead of a report.
var rowsOut string

type jsonRow struct{ What, Vigil, Baseline, Ratio, Note string }

func writeRows(path string, rows []row) error {
	out := make([]jsonRow, len(rows))
	for i, r := range rows {
		out[i] = jsonRow{r.what, r.vigil, r.baseline, r.ratio, r.note}
	}
	b, err := json.Marshal(out)
	if err != nil {
		return err
	}
	return os.WriteFile(path, b, 0o644)
}

func (b *bench) network(ctx context.Context) ([]row, error) {
	rows, err := b.inOwnNetNS(ctx, "network")
	if err != nil && rows == nil {
		return nil, err
	}
	if err != nil {
		// Keep what was measured, and say where it stopped.
		rows = append(rows, row{what: "Network section stopped early", vigil: "-", baseline: "-", ratio: "-",
			note: "the rest failed: see vigil-bench's output"})
	}
	return rows, nil
}

// inOwnNetNS runs section's inner part ("SECTION-inner") in a child
// vigil-bench in a network namespace of its own, and returns the rows it
// wrote, with its error if it failed after some.
func (b *bench) inOwnNetNS(ctx context.Context, section string) ([]row, error) {
	if os.Geteuid() != 0 {
		return nil, fmt.Errorf("the %s section needs root (it runs in a network namespace of its own)", section)
	}
	file := filepath.Join(b.tmp, section+"-rows.json")
	cmd := exec.CommandContext(ctx, os.Args[0], "-only", section+"-inner", "-runs", strconv.Itoa(b.runs), "-rows", file)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET}
	runErr := cmd.Run()
	raw, err := os.ReadFile(file)
	if err != nil {
		if runErr != nil {
			return nil, fmt.Errorf("in its own network namespace: %w", runErr)
		}
		return nil, err
	}
	var in []jsonRow
	if err := json.Unmarshal(raw, &in); err != nil {
		return nil, err
	}
	rows := make([]row, len(in))
	for i, r := range in {
		rows[i] = row{r.What, r.Vigil, r.Baseline, r.Ratio, r.Note}
	}
	return rows, runErr
}

// upLoopback brings up lo in a fresh network namespace.
func upLoopback() error {
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return err
	}
	return netlink.LinkSetUp(lo)
}

// networkInner runs in the namespace: throughput against user-mode
// networking and bare QEMU on a hand-made tap, a TCP stream through live
// migrations, and hang detection on a network.
func (b *bench) networkInner(ctx context.Context) ([]row, error) {
	// Rows are written as each part ends, so a later failure keeps them.
	var rows []row
	for _, part := range []func(context.Context) ([]row, error){b.throughput, b.streamThroughMigration, b.hangOnNetwork} {
		more, err := part(ctx)
		rows = append(rows, more...)
		if rowsOut != "" {
			writeRows(rowsOut, rows)
		}
		if err != nil {
			return rows, err
		}
	}
	return rows, nil
}

const benchSubnet = "10.80.0.0/24"

// throughput: iperf3 from the host to a Debian guest (and back, -R) on a
// managed network, on user-mode networking, and on bare QEMU with a tap
// on a bridge made by hand; the same image, memory and vCPU.
func (b *bench) throughput(ctx context.Context) ([]row, error) {
	image := os.Getenv("VIGIL_DEBIAN_IMAGE")
	if image == "" {
		return nil, errors.New("set VIGIL_DEBIAN_IMAGE (make bench does)")
	}
	if _, err := exec.LookPath("iperf3"); err != nil {
		return nil, errors.New("iperf3 is not installed (make bench installs it)")
	}
	if _, err := b.c.CreateNetwork(ctx, api.NetworkCreateRequest{Name: "bench", Subnet: benchSubnet}); err != nil {
		return nil, err
	}
	if err := b.importDebian(ctx, image); err != nil {
		return nil, err
	}
	boot := func(name string, nic api.NICRequest) (api.VM, error) {
		fmt.Fprintf(os.Stderr, "vigil-bench: booting %s\n", name)
		if _, err := b.c.CreateVM(ctx, api.VMCreateRequest{Name: name, Image: "bench-debian", MemoryBytes: realMem, CPUs: 1,
			DiskBytes: realDisk, UserData: realUserData, Start: true, NICs: []api.NICRequest{nic}}); err != nil {
			return api.VM{}, err
		}
		wctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
		defer cancel()
		return b.c.WaitGuest(wctx, name)
	}
	managed, err := boot("net-managed", api.NICRequest{Network: "bench"})
	if err != nil {
		return nil, err
	}
	user, err := boot("net-user", api.NICRequest{Network: "user"})
	if err != nil {
		return nil, err
	}
	for _, s := range []struct{ vm, cmd string }{{"net-managed", "iperf3 -s -D"}, {"net-user", "iperf3 -s -p 80 -D"}} {
		if res, err := b.c.Exec(ctx, s.vm, api.ExecRequest{Command: s.cmd, TimeoutSeconds: 30}); err != nil || res.ExitCode != 0 {
			return nil, fmt.Errorf("%s: start iperf3: %v %+v", s.vm, err, res)
		}
	}
	bare, bareAddr, err := b.bareOnTap(ctx, image)
	if err != nil {
		return nil, err
	}
	defer bare.stop()
	targets := []struct{ name, addr string }{
		{"managed", net.JoinHostPort(managed.NICs[0].IP, "5201")},
		{"user", user.Endpoint},
		{"bare", bareAddr},
	}
	for _, t := range targets {
		if err := waitTCP(ctx, t.addr, 5*time.Minute); err != nil {
			return nil, fmt.Errorf("iperf3 on %s: %w", t.name, err)
		}
	}
	got := map[string][]float64{}
	for i := range b.runs {
		fmt.Fprintf(os.Stderr, "vigil-bench: iperf3 round %d of %d\n", i+1, b.runs)
		for _, t := range targets {
			for _, rev := range []bool{false, true} {
				var gbps float64
				var err error
				// An iperf3 server serves one test at a time and can still
				// be busy with a connection that just closed: try again.
				for try := 0; try < 3; try++ {
					if gbps, err = iperf3(ctx, t.addr, rev); err == nil {
						break
					}
					time.Sleep(2 * time.Second)
				}
				if err != nil {
					return nil, fmt.Errorf("iperf3 to %s: %w", t.name, err)
				}
				k := t.name
				if rev {
					k += "-R"
				}
				got[k] = append(got[k], gbps)
			}
		}
	}
	for _, vm := range []string{"net-managed", "net-user"} {
		if err := b.c.DeleteVM(ctx, vm, true); err != nil {
			return nil, err
		}
	}
	how := "1 GiB Debian guest, 1 vCPU, virtio-net; iperf3 4 s per run"
	return []row{
		versusF("TCP throughput host → guest, Vigil managed network (bridge, tap, nftables rules)", got["managed"], got["bare"], "Gbit/s",
			"bare QEMU, same image and devices, on a tap and bridge made by hand", how+"; target ≥ 0.95"),
		versusF("TCP throughput guest → host, Vigil managed network", got["managed-R"], got["bare-R"], "Gbit/s",
			"bare QEMU on a hand-made tap", how+" (iperf3 -R); target ≥ 0.95"),
		versusF("TCP throughput host → guest, Vigil managed network vs Vigil user-mode networking", got["managed"], got["user"], "Gbit/s",
			"the same guest on QEMU's user-mode network, through its forwarded port", how),
		versusF("TCP throughput guest → host, Vigil managed network vs user-mode networking", got["managed-R"], got["user-R"], "Gbit/s",
			"user-mode, forwarded port", how+" (iperf3 -R)"),
	}, nil
}

// bareOnTap boots the Debian image by hand on a tap of a bridge made with
// netlink, its address from a cloud-init network-config, iperf3 started by
// user-data; it returns the iperf3 address.
func (b *bench) bareOnTap(ctx context.Context, image string) (*bareVM, string, error) {
	attrs := netlink.NewLinkAttrs()
	attrs.Name = "brbare"
	if err := netlink.LinkAdd(&netlink.Bridge{LinkAttrs: attrs}); err != nil {
		return nil, "", fmt.Errorf("bridge: %w", err)
	}
	br, err := netlink.LinkByName("brbare")
	if err != nil {
		return nil, "", err
	}
	addr, _ := netlink.ParseAddr("10.90.0.1/24")
	if err := netlink.AddrAdd(br, addr); err != nil {
		return nil, "", err
	}
	if err := netlink.LinkSetUp(br); err != nil {
		return nil, "", err
	}
	tattrs := netlink.NewLinkAttrs()
	tattrs.Name = "tapbare"
	if err := netlink.LinkAdd(&netlink.Tuntap{LinkAttrs: tattrs, Mode: netlink.TUNTAP_MODE_TAP,
		Flags: netlink.TUNTAP_NO_PI | netlink.TUNTAP_VNET_HDR | netlink.TUNTAP_ONE_QUEUE}); err != nil {
		return nil, "", fmt.Errorf("tap: %w", err)
	}
	tap, err := netlink.LinkByName("tapbare")
	if err != nil {
		return nil, "", err
	}
	if err := netlink.LinkSetMaster(tap, br); err != nil {
		return nil, "", err
	}
	if err := netlink.LinkSetUp(tap); err != nil {
		return nil, "", err
	}
	dir := filepath.Join(b.tmp, "bare-net")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, "", err
	}
	accel, _ := qemu.ChooseAccel("auto")
	uuid := "00000000-0000-4000-8000-0000000000bb"
	const mac = "52:54:00:90:00:02"
	m := qemu.Machine{Name: "bare-net", UUID: uuid, MemoryBytes: realMem, RAMPad: true, CPUs: 1, Accel: accel, Disk: filepath.Join(dir, "disk.qcow2"),
		Dir: dir, GuestAgent: true, Display: true, Seed: filepath.Join(dir, "seed.iso"), NICs: []qemu.NIC{{Tap: "tapbare", MAC: mac}}}
	if out, err := exec.CommandContext(ctx, "qemu-img", "create", "-q", "-f", "qcow2", "-b", image, "-F", "qcow2", m.Disk, fmt.Sprint(realDisk)).CombinedOutput(); err != nil {
		return nil, "", fmt.Errorf("qemu-img: %v: %s", err, out)
	}
	netConfig, err := cloudinit.NetworkConfig([]cloudinit.Interface{{MAC: mac, Address: netip.MustParsePrefix("10.90.0.2/24"),
		Gateway: netip.MustParseAddr("10.90.0.1")}})
	if err != nil {
		return nil, "", err
	}
	seed, err := cloudinit.Seed(cloudinit.Meta{InstanceID: uuid, Hostname: "bare-net"}, []byte(realUserData), netConfig)
	if err != nil {
		return nil, "", err
	}
	if err := os.WriteFile(m.Seed, seed, 0o644); err != nil {
		return nil, "", err
	}
	fmt.Fprintln(os.Stderr, "vigil-bench: booting bare-net")
	bv, err := startBare(ctx, m)
	if err != nil {
		return nil, "", err
	}
	// iperf3 is started through qemu-ga, as on Vigil's side (a daemon
	// started by cloud-init's runcmd can go with cloud-final's cgroup).
	for deadline := time.Now().Add(10 * time.Minute); ; time.Sleep(time.Second) {
		dctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		cl, err := qga.Dial(dctx, m.QGASocket())
		if err == nil {
			err = cl.Ping(dctx)
		}
		cancel()
		if err == nil {
			xctx, cancel := context.WithTimeout(ctx, time.Minute)
			res, err := cl.Exec(xctx, "/bin/sh", []string{"-c", "iperf3 -s -D"}, nil, nil, 1<<16)
			cancel()
			cl.Close()
			if err != nil || res.ExitCode != 0 {
				bv.stop()
				return nil, "", fmt.Errorf("bare-net: start iperf3: %v (exit %d)", err, res.ExitCode)
			}
			return bv, "10.90.0.2:5201", nil
		}
		if cl != nil {
			cl.Close()
		}
		if time.Now().After(deadline) {
			bv.stop()
			return nil, "", errors.New("bare-net: qemu-guest-agent never answered")
		}
	}
}

func waitTCP(ctx context.Context, addr string, d time.Duration) error {
	deadline := time.Now().Add(d)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return err
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// iperf3 runs one 4-second TCP test to addr (reverse: the guest sends) and
// returns what the receiver got, in Gbit/s.
func iperf3(ctx context.Context, addr string, reverse bool) (float64, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return 0, err
	}
	args := []string{"-c", host, "-p", port, "-t", "4", "-J"}
	if reverse {
		args = append(args, "-R")
	}
	out, err := exec.CommandContext(ctx, "iperf3", args...).Output()
	var res struct {
		End struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
		Error string `json:"error"`
	}
	if jerr := json.Unmarshal(out, &res); jerr != nil {
		return 0, fmt.Errorf("iperf3: %v (%v)", err, jerr)
	}
	if res.Error != "" {
		return 0, errors.New(res.Error)
	}
	return res.End.SumReceived.BitsPerSecond / 1e9, nil
}

// streamThroughMigration keeps a TCP stream open from the host to an echo
// server in a guest on a managed network while the guest moves between two
// hosts, runs times: the longest the client waited for an echo, and any
// byte lost or out of order.
func (b *bench) streamThroughMigration(ctx context.Context) ([]row, error) {
	cl, err := startCluster(ctx, filepath.Join(b.tmp, "nm"), timing{}, "h1", "h2")
	if err != nil {
		return nil, err
	}
	defer cl.stop()
	c := cl.c
	if _, err := c.CreateNetwork(ctx, api.NetworkCreateRequest{Name: "mig", Subnet: "10.82.0.0/24"}); err != nil {
		return nil, err
	}
	vm, err := c.CreateVM(ctx, api.VMCreateRequest{Name: "stream", MemoryBytes: 128 << 20, CPUs: 1, DiskBytes: 256 << 20, Host: "h1",
		Start: true, NICs: []api.NICRequest{{Network: "mig"}}})
	if err != nil {
		return nil, err
	}
	if _, err := c.WaitGuest(ctx, "stream"); err != nil {
		return nil, err
	}
	if _, err := c.Exec(ctx, "stream", api.ExecRequest{Command: "nc -ll -p 9000 -e /bin/cat", Background: true}); err != nil {
		return nil, err
	}
	addr := net.JoinHostPort(vm.NICs[0].IP, "9000")
	if err := waitTCP(ctx, addr, time.Minute); err != nil {
		return nil, err
	}
	var stalls, downtimes []time.Duration
	var sent, lost uint64
	host := "h1"
	for i := range b.runs {
		fmt.Fprintf(os.Stderr, "vigil-bench: tcp stream through migration %d of %d\n", i+1, b.runs)
		to := map[string]string{"h1": "h2", "h2": "h1"}[host]
		s, err := echoDuring(addr, func() error {
			moved, err := c.Migrate(ctx, "stream", to)
			if err == nil && moved.LastOperation != nil {
				downtimes = append(downtimes, time.Duration(moved.LastOperation.PausedMS*float64(time.Millisecond)))
			}
			return err
		})
		if err != nil {
			return nil, fmt.Errorf("migration %d: %w", i+1, err)
		}
		stalls = append(stalls, s.maxStall)
		sent += s.sent
		lost += s.sent - s.echoed
		host = to
	}
	return []row{versus(
		fmt.Sprintf("Live migration with a TCP stream open from the host to the guest (128 MiB guest on a managed network; %d migrations): longest wait for an echo", b.runs),
		stalls, downtimes, ms, "the guest's own pause, QEMU's downtime figure",
		fmt.Sprintf("%d of %d messages (8 bytes every 10 ms) lost or out of order; the stream stayed open through every move. Under TCG Vigil stops the guest for the whole copy (docs/architecture.md), so the stall is the copy", lost, sent))}, nil
}

type streamStats struct {
	sent, echoed uint64
	maxStall     time.Duration
}

// echoDuring streams counters to an echo server every 10 ms for a second,
// while during runs, and for two seconds after; every counter must come
// back in order.
func echoDuring(addr string, during func() error) (streamStats, error) {
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return streamStats{}, err
	}
	defer conn.Close()
	var (
		mu  sync.Mutex
		st  streamStats
		bad error
	)
	stop := make(chan struct{})
	readDone := make(chan struct{})
	go func() {
		defer close(readDone)
		last := time.Now()
		var buf [8]byte
		for {
			conn.SetReadDeadline(time.Now().Add(60 * time.Second))
			if _, err := io.ReadFull(conn, buf[:]); err != nil {
				return
			}
			now := time.Now()
			v := binary.BigEndian.Uint64(buf[:])
			mu.Lock()
			if v != st.echoed+1 && bad == nil {
				bad = fmt.Errorf("echo %d after %d", v, st.echoed)
			}
			st.echoed = v
			if d := now.Sub(last); d > st.maxStall {
				st.maxStall = d
			}
			last = now
			done := st.echoed == st.sent
			mu.Unlock()
			select {
			case <-stop:
				if done {
					return
				}
			default:
			}
		}
	}()
	writeDone := make(chan struct{})
	go func() {
		defer close(writeDone)
		for i := uint64(1); ; i++ {
			select {
			case <-stop:
				return
			case <-time.After(10 * time.Millisecond):
			}
			var buf [8]byte
			binary.BigEndian.PutUint64(buf[:], i)
			if _, err := conn.Write(buf[:]); err != nil {
				return
			}
			mu.Lock()
			st.sent = i
			mu.Unlock()
		}
	}()
	time.Sleep(time.Second)
	derr := during()
	time.Sleep(2 * time.Second)
	close(stop)
	<-writeDone
	select {
	case <-readDone:
	case <-time.After(30 * time.Second):
	}
	conn.SetReadDeadline(time.Now())
	<-readDone
	mu.Lock()
	defer mu.Unlock()
	if derr != nil {
		return st, derr
	}
	return st, bad
}

// hangOnNetwork: a guest on a managed network frozen (its kernel too) is
// detected after the hang timeout; an idle one with only its agent
// stopped is never restarted (its kernel answers the host's ARP probes).
func (b *bench) hangOnNetwork(ctx context.Context) ([]row, error) {
	policy := &api.RecoveryPolicy{HangTimeoutSeconds: 10, MinUptimeSeconds: 5}
	var detect []time.Duration
	for i := range b.runs {
		fmt.Fprintf(os.Stderr, "vigil-bench: hang on a network %d of %d\n", i+1, b.runs)
		name := fmt.Sprintf("hang%d", i)
		if _, err := b.c.CreateVM(ctx, api.VMCreateRequest{Name: name, MemoryBytes: 128 << 20, CPUs: 1, DiskBytes: 256 << 20,
			Start: true, Policy: policy, NICs: []api.NICRequest{{Network: "bench"}}}); err != nil {
			return nil, err
		}
		if _, err := b.c.WaitGuest(ctx, name); err != nil {
			return nil, err
		}
		time.Sleep(6 * time.Second) // past the grace period
		t0 := time.Now()
		if err := b.c.Fault(ctx, name, "hang"); err != nil {
			return nil, err
		}
		var inc api.Incident
		for deadline := time.Now().Add(time.Minute); ; time.Sleep(50 * time.Millisecond) {
			incs, err := b.c.Incidents(ctx, name)
			if err != nil {
				return nil, err
			}
			if len(incs) > 0 && incs[0].RecoveredAt != nil {
				inc = incs[0] // recovered: the VM is free to delete
				break
			}
			if time.Now().After(deadline) {
				return nil, fmt.Errorf("%s: the hang was not detected and recovered within a minute", name)
			}
		}
		if inc.Kind != "hang" {
			return nil, fmt.Errorf("%s: incident %s, want hang", name, inc.Kind)
		}
		detect = append(detect, inc.DetectedAt.Sub(t0))
		if err := b.c.DeleteVM(ctx, name, true); err != nil {
			return nil, err
		}
	}
	// The false-positive side: idle guests with their agent stopped.
	const watch = 30 * time.Second
	falseRestarts := 0
	idle := min(b.runs, 3)
	for i := range idle {
		name := fmt.Sprintf("idle%d", i)
		if _, err := b.c.CreateVM(ctx, api.VMCreateRequest{Name: name, MemoryBytes: 128 << 20, CPUs: 1, DiskBytes: 256 << 20,
			Start: true, Policy: policy, NICs: []api.NICRequest{{Network: "bench"}}}); err != nil {
			return nil, err
		}
		if _, err := b.c.WaitGuest(ctx, name); err != nil {
			return nil, err
		}
		time.Sleep(6 * time.Second)
		if err := b.c.Fault(ctx, name, "agent-stop"); err != nil {
			return nil, err
		}
	}
	time.Sleep(watch)
	for i := range idle {
		name := fmt.Sprintf("idle%d", i)
		incs, err := b.c.Incidents(ctx, name)
		if err != nil {
			return nil, err
		}
		falseRestarts += len(incs)
		b.c.DeleteVM(ctx, name, true)
	}
	target := make([]time.Duration, len(detect))
	for i := range target {
		target[i] = 10 * time.Second
	}
	return []row{
		versus(fmt.Sprintf("Hang of a guest on a managed network (kernel frozen, no ARP answers): fault → detection (%d runs)", len(detect)),
			detect, target, ms, "the hang timeout, 10 s", "detection needs the whole timeout of silence: heartbeats, CPU, disk, frames sent and ARP answers"),
		{what: fmt.Sprintf("Idle guests on a managed network with their agent stopped (%d guests watched %s past a 10 s hang timeout): restarts", idle, watch),
			vigil: strconv.Itoa(falseRestarts), baseline: "target 0", ratio: "-",
			note: "their kernels answer the host's ARP probes, so they are agent-unwell, not hung; also asserted by integration.TestNetworks and TestRealGuestNetwork"},
	}, nil
}
