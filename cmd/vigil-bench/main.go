// Command vigil-bench measures Vigil against baselines taken in the same run
// and prints a Markdown table (and writes it to -out). `make bench` runs it.
package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/client"
	"github.com/vigil-project/vigil/internal/agent"
	"github.com/vigil-project/vigil/internal/guestimage"
	"github.com/vigil-project/vigil/internal/qemu"
)

func main() {
	out := flag.String("out", "", "also write the report to this Markdown file")
	runs := flag.Int("runs", 10, "runs per series, each side, in every section (pause/resume, list, soak and realguest have their own counts); p50 and p99 need at least 10")
	listRuns := flag.Int("list-runs", 100, "requests per list-latency series")
	only := flag.String("only", "", "comma-separated sections to run: start,state,snapshot,recovery,managers,hostdeath,migrate,protect,list,soak,realguest,network,netboot,libvirt,idle,dashboard,list (default all)")
	realRuns := flag.Int("real-runs", 10, "runs per real-guest series (a Debian boot takes over a minute under TCG)")
	soakFor := flag.Duration("soak", 10*time.Minute, "how long the etcd soak runs (100 simulated hosts heartbeating)")
	flag.StringVar(&rowsOut, "rows", "", "internal: write the rows as JSON to this file (the network section's child run)")
	flag.Parse()
	if rowsOut != "" {
		if err := upLoopback(); err != nil {
			fmt.Fprintln(os.Stderr, "vigil-bench: bring up lo:", err)
			os.Exit(1)
		}
	}
	soakDuration, realGuestRuns = *soakFor, *realRuns
	if err := run(*out, *runs, *listRuns, *only); err != nil {
		fmt.Fprintln(os.Stderr, "vigil-bench:", err)
		os.Exit(1)
	}
}

// soakDuration is how long the soak section runs (-soak); realGuestRuns
// how many runs each real-guest series has (-real-runs).
var (
	soakDuration  time.Duration
	realGuestRuns int
)

// row is one line of the report: Vigil's figure, the same-run baseline, ratio.
type row struct {
	what, vigil, baseline, ratio, note string
}

func run(outPath string, runs, listRuns int, only string) error {
	want := func(section string) bool {
		if section == "network-inner" || section == "netboot-inner" { // only ever asked for by name
			return strings.Contains(","+only+",", ","+section+",")
		}
		return only == "" || strings.Contains(","+only+",", ","+section+",")
	}
	imageDir := os.Getenv("VIGIL_TEST_IMAGE")
	binDir := os.Getenv("VIGIL_BIN")
	if imageDir == "" || binDir == "" {
		return errors.New("set VIGIL_TEST_IMAGE and VIGIL_BIN (make bench does)")
	}
	img, err := guestimage.Load(imageDir)
	if err != nil {
		return err
	}
	tmp, err := os.MkdirTemp("", "vb")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	addr, err := freeAddr()
	if err != nil {
		return err
	}
	ready := make(chan string, 1)
	done := make(chan error, 1)
	go func() {
		done <- agent.RunDev(ctx, agent.DevConfig{
			Listen: addr, DataDir: filepath.Join(tmp, "d"), ImageDir: imageDir, Accel: "auto",
			Logger: slog.New(slog.DiscardHandler), Ready: func(a string) { ready <- a },
		})
	}()
	select {
	case <-ready:
	case err := <-done:
		return fmt.Errorf("dev agent: %w", err)
	}
	c := clientFor(filepath.Join(tmp, "d"))

	var rows []row
	accel, _ := qemu.ChooseAccel("auto")
	b := &bench{c: c, img: img, tmp: tmp, dataDir: filepath.Join(tmp, "d"), runs: runs, accel: accel}
	sections := []struct {
		name string
		f    func(context.Context) ([]row, error)
	}{
		{"start", b.start},
		{"state", b.state},
		{"snapshot", b.snapshots},
		{"recovery", b.recovery},
		{"managers", b.managers},
		{"hostdeath", b.hostDeath},
		{"migrate", b.migrate},
		{"protect", b.protect},
		{"soak", func(ctx context.Context) ([]row, error) { return b.soak(ctx, 100, 5, soakDuration) }},
		{"realguest", func(ctx context.Context) ([]row, error) { return b.realGuest(ctx, realGuestRuns) }},
		{"network", b.network},
		{"network-inner", b.networkInner},
		{"netboot", b.netboot},
		{"netboot-inner", b.netbootInner},
		{"libvirt", b.libvirtCompare},
		{"idle", b.idle},
		{"dashboard", b.dashboard},
		{"list", func(ctx context.Context) ([]row, error) {
			return benchList(ctx, c, filepath.Join(binDir, "vigil"), filepath.Join(tmp, "d", "client.yaml"), listRuns)
		}},
	}
	// A section that fails keeps the rows it measured before the failure,
	// and the report keeps every section measured: an hour of real-guest
	// runs is not thrown away for its last series.
	var failed error
	for _, sec := range sections {
		if !want(sec.name) {
			continue
		}
		fmt.Fprintf(os.Stderr, "vigil-bench: %s...\n", sec.name)
		r, err := sec.f(ctx)
		rows = append(rows, r...)
		if err != nil {
			failed = fmt.Errorf("%s: %w", sec.name, err)
			break
		}
	}

	cancel()
	<-done
	if rowsOut != "" {
		return errors.Join(failed, writeRows(rowsOut, rows))
	}
	report := render(rows, accel, runs, listRuns)
	if failed != nil {
		report += fmt.Sprintf("\n**This run stopped early**: %v. The rows above were measured before that.\n", failed)
	}
	fmt.Print(report)
	if outPath != "" {
		if err := os.WriteFile(outPath, []byte(report), 0o644); err != nil {
			return errors.Join(failed, err)
		}
	}
	return failed
}

// start times create --start until the first guest heartbeat, against
// bare QEMU started with the same command line on a fresh disk until its
// first heartbeat. Both sides boot a blank disk, so both format /data.
func (b *bench) start(ctx context.Context) ([]row, error) {
	bin, err := qemu.FindBinary()
	if err != nil {
		return nil, err
	}
	var vigil, bare []time.Duration
	for i := 0; i < b.runs; i++ {
		// Alternate, so drift in the machine's load hits both sides alike.
		name := fmt.Sprintf("bench%d", i)
		t0 := time.Now()
		if _, err := b.c.CreateVM(ctx, api.VMCreateRequest{Name: name, MemoryBytes: 128 << 20, CPUs: 1, DiskBytes: 256 << 20, Start: true}); err != nil {
			return nil, err
		}
		if _, err := b.c.WaitGuest(ctx, name); err != nil {
			return nil, err
		}
		vigil = append(vigil, time.Since(t0))
		if err := b.c.DeleteVM(ctx, name); err != nil {
			return nil, err
		}

		d, err := bareBoot(ctx, bin, b.accel, b.img, filepath.Join(b.tmp, fmt.Sprintf("bare%d", i)))
		if err != nil {
			return nil, err
		}
		bare = append(bare, d)
	}
	mv, mb := p(vigil, 50), p(bare, 50)
	return []row{versus(
		fmt.Sprintf("Start latency: create --start → first guest heartbeat (128 MiB, 1 vCPU, blank 256 MiB disk; %d runs)", b.runs),
		vigil, bare, ms, "bare qemu-system-x86_64, same image and devices, until the same first heartbeat",
		fmt.Sprintf("Vigil adds %+.1f%% at p50", 100*(float64(mv)/float64(mb)-1)))}, nil
}

// bareBoot starts QEMU by hand (its disk created with qemu-img, as an
// operator would) and waits for the first heartbeat on the agent socket.
func bareBoot(ctx context.Context, bin, accel string, img *guestimage.Image, dir string) (time.Duration, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return 0, err
	}
	port, err := freePort()
	if err != nil {
		return 0, err
	}
	m := qemu.Machine{Name: "bare", UUID: "00000000-0000-4000-8000-000000000001", MemoryBytes: 128 << 20, RAMPad: true, CPUs: 1, Accel: accel,
		Kernel: img.Kernel, Initrd: img.Initrd, Cmdline: img.Cmdline + " vigil.name=bare",
		Disk: filepath.Join(dir, "disk.qcow2"), HostPort: port, Dir: dir, GuestAgent: true}
	t0 := time.Now()
	// A disk left by an earlier boot in dir is reused (a reboot of a
	// formatted disk); otherwise a blank one is made, as Vigil's create does.
	if _, err := os.Stat(m.Disk); err != nil {
		if out, err := exec.CommandContext(ctx, "qemu-img", "create", "-q", "-f", "qcow2", m.Disk, "256M").CombinedOutput(); err != nil {
			return 0, fmt.Errorf("qemu-img: %v: %s", err, out)
		}
	}
	args := m.Args()
	args = args[:len(args)-1] // no -daemonize: a plain foreground child
	cmd := exec.CommandContext(ctx, bin, args...)
	if err := cmd.Start(); err != nil {
		return 0, err
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		conn, err := net.Dial("unix", m.AgentSocket())
		if err != nil {
			time.Sleep(5 * time.Millisecond)
			continue
		}
		line, err := bufio.NewReader(conn).ReadString('\n')
		conn.Close()
		if err == nil && strings.Contains(line, `"heartbeat"`) {
			return time.Since(t0), nil
		}
	}
	return 0, errors.New("bare qemu: no heartbeat within 60s")
}

// benchList times listing VMs with 1 and with 200 (stopped) VMs defined,
// through the SDK and through the CLI binary, against the API's floor: a
// GET /v1/health round trip in the same run (TLS and routing; no token
// check, no store read).
func benchList(ctx context.Context, c *client.Client, vigilBin, config string, n int) ([]row, error) {
	floor, err := sample(n, func() error {
		code, _, err := c.Raw(ctx, http.MethodGet, "/v1/health", nil)
		if err == nil && code != http.StatusOK {
			err = fmt.Errorf("GET /v1/health: %d", code)
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	cliFloor, err := sample(n/4, func() error { return exec.Command(vigilBin, "--config", config, "host", "list").Run() })
	if err != nil {
		return nil, err
	}
	var rows []row
	defined := 0
	for _, count := range []int{1, 200} {
		for ; defined < count; defined++ {
			if _, err := c.CreateVM(ctx, api.VMCreateRequest{Name: fmt.Sprintf("list%03d", defined), MemoryBytes: 64 << 20, CPUs: 1, DiskBytes: 64 << 20}); err != nil {
				return nil, err
			}
		}
		api, err := sample(n, func() error {
			vms, err := c.VMs(ctx)
			if err == nil && len(vms) != count {
				err = fmt.Errorf("listed %d vms, want %d", len(vms), count)
			}
			return err
		})
		if err != nil {
			return nil, err
		}
		cli, err := sample(n/4, func() error { return exec.Command(vigilBin, "--config", config, "vm", "list").Run() })
		if err != nil {
			return nil, err
		}
		var size int
		scrape, err := sample(n, func() error {
			b, err := c.Metrics(ctx)
			size = len(b)
			if err == nil && !bytes.Contains(b, []byte(fmt.Sprintf(`state="stopped",vm="list%03d"} 1`, count-1))) {
				err = fmt.Errorf("/metrics lacks vm list%03d", count-1)
			}
			return err
		})
		if err != nil {
			return nil, err
		}
		rows = append(rows,
			versus(fmt.Sprintf("API GET /metrics (the whole cluster), %d VM(s) defined", count), scrape, floor, ms2, "GET /v1/health",
				fmt.Sprintf("%.1f KB of Prometheus text", float64(size)/1000)),
			versus(fmt.Sprintf("API GET /v1/vms, %d VM(s) defined", count), api, floor, ms2, "GET /v1/health", ""),
			versus(fmt.Sprintf("CLI `vigil vm list`, %d VM(s) defined", count), cli, cliFloor, ms2, "`vigil host list`", "includes process start"))
	}
	return rows, nil
}

func sample(n int, f func() error) ([]time.Duration, error) {
	var ds []time.Duration
	for i := 0; i < n; i++ {
		t0 := time.Now()
		if err := f(); err != nil {
			return nil, err
		}
		ds = append(ds, time.Since(t0))
	}
	return ds, nil
}

func p(ds []time.Duration, q int) time.Duration {
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	i := (len(s)*q + 99) / 100
	if i > 0 {
		i--
	}
	return s[i]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.0f ms", float64(d)/float64(time.Millisecond)) }

func ms1(d time.Duration) string { return fmt.Sprintf("%.1f ms", float64(d)/float64(time.Millisecond)) }

func ms2(d time.Duration) string { return fmt.Sprintf("%.2f ms", float64(d)/float64(time.Millisecond)) }

// pctWith reports a series as its p50 and p99, each formatted with f.
func pctWith(ds []time.Duration, f func(time.Duration) string) string {
	return "p50 " + f(p(ds, 50)) + ", p99 " + f(p(ds, 99))
}

func pct(ds []time.Duration) string { return pctWith(ds, ms2) }

// ratio is a/b for the Ratio column, "-" without a baseline. Small ratios
// get a third digit so that they do not round to 0.
func ratio(a, b float64) string {
	switch r := a / b; {
	case b <= 0:
		return "-"
	case r < 0.1:
		return fmt.Sprintf("%.3f", r)
	default:
		return fmt.Sprintf("%.2f", r)
	}
}

// versus is the row of a Vigil series against its baseline series from the
// same run: both as p50 and p99 (formatted with f), the ratio of the p50s.
// baseHow says what the baseline is; note, if any, follows "p50 ratio".
func versus(what string, vigil, base []time.Duration, f func(time.Duration) string, baseHow, note string) row {
	return row{what: what, vigil: pctWith(vigil, f), baseline: pctWith(base, f) + " (" + baseHow + ")",
		ratio: ratio(float64(p(vigil, 50)), float64(p(base, 50))), note: appendNote("p50 ratio", note)}
}

// versusF is versus for throughput series in unit, where higher is better:
// each side as p50 and p1 (the slow tail), the ratio of the p50s.
func versusF(what string, vigil, base []float64, unit, baseHow, note string) row {
	return row{what: what, vigil: pctF(vigil, unit), baseline: pctF(base, unit) + " (" + baseHow + ")",
		ratio: ratio(pF(vigil, 50), pF(base, 50)), note: appendNote("p50 ratio, higher is better", note)}
}

func appendNote(head, note string) string {
	if note == "" {
		return head
	}
	return head + "; " + note
}

func render(rows []row, accel string, runs, listRuns int) string {
	var b strings.Builder
	host, _ := os.Hostname()
	fmt.Fprintf(&b, "# Benchmarks\n\nMade by `make bench` (runs `go run ./cmd/vigil-bench -out docs/benchmarks.md`) on %s, %s, accel %s, %s.\n",
		host, time.Now().UTC().Format("2006-01-02 15:04 MST"), accel, machine())
	fmt.Fprintf(&b, "Each figure has its baseline measured in the same run; ratio = Vigil / baseline (lower is better, 1.00 = no overhead).\n\n")
	fmt.Fprintf(&b, "| Measurement | Vigil | Baseline (same run) | Ratio | Notes |\n|---|---|---|---|---|\n")
	for _, r := range rows {
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s |\n", r.what, r.vigil, r.baseline, r.ratio, r.note)
	}
	fmt.Fprintf(&b, "\nEvery Vigil figure, and every baseline measured here, is a series of %d runs (-runs), reported as p50 and p99 (p50 and p1, the slow tail, for throughput); ratios are of the p50s. "+
		"Exceptions: pause + resume, 100 pairs; list, %d API requests and %d CLI runs per point; real guest, %d runs (-real-runs); the etcd soak, one run of %s. ",
		runs, listRuns, listRuns/4, realGuestRuns, soakDuration)
	if runs < 100 {
		fmt.Fprintf(&b, "With %d runs, p99 is the slowest run. ", runs)
	}
	fmt.Fprintf(&b, "Vigil and baseline runs alternate in start, suspend/resume from disk, host death and migration, so drift in the machine's load hits both sides; "+
		"the snapshot baseline runs after Vigil's series (two guests at once would slow each other), the fault-recovery baseline once before the faults, shared by the three kinds.\n")
	return b.String()
}

func machine() string {
	n := 0
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		n = strings.Count(string(b), "processor\t:")
	}
	return fmt.Sprintf("%d CPUs", n)
}

func freeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// clientFor is an API client with the admin configuration an agent wrote
// in dataDir (an unusable one, that says why, until the file exists).
func clientFor(dataDir string) *client.Client {
	return client.ForConfigFile(filepath.Join(dataDir, "client.yaml"))
}
