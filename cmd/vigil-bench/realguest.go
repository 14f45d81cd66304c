package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/cloudinit"
	"github.com/vigil-project/vigil/internal/qemu"
	"github.com/vigil-project/vigil/internal/qga"
)

// The real guest: Debian's image with cloud-init and qemu-guest-agent
// (scripts/build-debian-image.sh), 1 GiB, 1 vCPU, a 4 GiB overlay disk.
const (
	realMem      = 1 << 30
	realDisk     = 4 << 30
	realUserData = "#cloud-config\n"
)

// realGuest measures a real distribution image: the boot until its
// qemu-guest-agent answers, the disk inside the guest, quiesced and
// crash-consistent disk snapshots; each against bare QEMU doing the same
// by hand with the same image, devices and cache mode, in the same run.
func (b *bench) realGuest(ctx context.Context, runs int) ([]row, error) {
	image := os.Getenv("VIGIL_DEBIAN_IMAGE")
	if image == "" {
		return nil, errors.New("set VIGIL_DEBIAN_IMAGE to scripts/build-debian-image.sh's image (make bench does)")
	}
	if err := b.importDebian(ctx, image); err != nil {
		return nil, err
	}
	rows, err := b.realBoots(ctx, image, runs)
	if err != nil {
		return nil, err
	}
	more, err := b.realDiskAndSnapshots(ctx, image, runs)
	return append(rows, more...), err
}

// importDebian imports the Debian test image as bench-debian.
func (b *bench) importDebian(ctx context.Context, image string) error {
	f, err := os.Open(image)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	_, err = b.c.ImportImage(ctx, "bench-debian", f, st.Size())
	return err
}

// realBoots: create --start until qemu-ga answers, against bare QEMU from
// qemu-img create (the overlay) and the same seed to the first answer.
func (b *bench) realBoots(ctx context.Context, image string, runs int) ([]row, error) {
	var vigil, bare []time.Duration
	for i := range runs {
		fmt.Fprintf(os.Stderr, "vigil-bench: real guest boot %d of %d\n", i+1, runs)
		name := fmt.Sprintf("rg%d", i)
		t0 := time.Now()
		if _, err := b.c.CreateVM(ctx, api.VMCreateRequest{Name: name, Image: "bench-debian", MemoryBytes: realMem, CPUs: 1,
			DiskBytes: realDisk, UserData: realUserData, Start: true}); err != nil {
			return nil, err
		}
		wctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
		_, err := b.c.WaitGuest(wctx, name)
		cancel()
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		vigil = append(vigil, time.Since(t0))
		if err := b.c.DeleteVM(ctx, name, true); err != nil {
			return nil, err
		}

		bv, d, err := b.bareReal(ctx, image, fmt.Sprintf("bare-rg%d", i))
		if err != nil {
			return nil, err
		}
		bv.vm.stop()
		bv.qga.Close()
		bare = append(bare, d)
	}
	return []row{{
		what:     fmt.Sprintf("Real guest start: create --start → qemu-guest-agent answers (Debian 12 image, cloud-init, 1 GiB, 1 vCPU, 4 GiB overlay; %d runs)", runs),
		vigil:    pct(vigil),
		baseline: pct(bare) + " (bare qemu-system-x86_64: qemu-img overlay, the same seed and devices, until the same first answer)",
		ratio:    fmt.Sprintf("%.3f", float64(p(vigil, 50))/float64(p(bare, 50))),
		note:     "p50 ratio (target ≤ 1.05)",
	}}, nil
}

// bareBoot is a real guest run by hand.
type bareReal struct {
	vm  *bareVM
	qga *qga.Client
}

// bareReal boots the image by hand: an overlay made with qemu-img, the
// seed written with the same code and content Vigil uses, QEMU with the
// same devices; it returns once qemu-ga answers, and how long that took.
func (b *bench) bareReal(ctx context.Context, image, name string) (*bareReal, time.Duration, error) {
	dir := filepath.Join(b.tmp, name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, 0, err
	}
	port, err := freePort()
	if err != nil {
		return nil, 0, err
	}
	accel, _ := qemu.ChooseAccel("auto")
	uuid := "00000000-0000-4000-8000-0000000000aa"
	m := qemu.Machine{Name: name, UUID: uuid, MemoryBytes: realMem, RAMPad: true, CPUs: 1, Accel: accel, Disk: filepath.Join(dir, "disk.qcow2"),
		HostPort: port, Dir: dir, GuestAgent: true, Display: true, Seed: filepath.Join(dir, "seed.iso")}
	t0 := time.Now()
	if out, err := exec.CommandContext(ctx, "qemu-img", "create", "-q", "-f", "qcow2", "-b", image, "-F", "qcow2", m.Disk, fmt.Sprint(realDisk)).CombinedOutput(); err != nil {
		return nil, 0, fmt.Errorf("qemu-img: %v: %s", err, out)
	}
	seed, err := cloudinit.Seed(cloudinit.Meta{InstanceID: uuid, Hostname: name}, []byte(realUserData), nil)
	if err != nil {
		return nil, 0, err
	}
	if err := os.WriteFile(m.Seed, seed, 0o644); err != nil {
		return nil, 0, err
	}
	bv, err := startBare(ctx, m)
	if err != nil {
		return nil, 0, err
	}
	deadline := time.Now().Add(10 * time.Minute)
	for time.Now().Before(deadline) {
		// As Vigil's host agent does: a connection attempt bounded by 3 s,
		// then a ping.
		dctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		cl, err := qga.Dial(dctx, m.QGASocket())
		if err == nil {
			err = cl.Ping(dctx)
		}
		cancel()
		if err == nil {
			return &bareReal{vm: bv, qga: cl}, time.Since(t0), nil
		}
		if cl != nil {
			cl.Close()
		}
		time.Sleep(time.Second / 10)
	}
	bv.stop()
	return nil, 0, errors.New("bare real guest: qemu-guest-agent never answered")
}

// fioJob is one disk measurement inside the guest.
type fioJob struct {
	name, args string
	// read: the figure is the job's read side, else its write side; iops:
	// the figure is operations per second, else MiB/s.
	read, iops bool
}

var fioJobs = []fioJob{
	{"sequential write, 1 MiB blocks, O_DIRECT, fsync at the end", "--rw=write --bs=1M --size=256M --end_fsync=1", false, false},
	{"sequential read, 1 MiB blocks, O_DIRECT", "--rw=read --bs=1M --size=256M", true, false},
	{"random read, 4 KiB, queue depth 16", "--rw=randread --bs=4k --size=256M --ioengine=libaio --iodepth=16 --runtime=5 --time_based", true, true},
	{"random write, 4 KiB, queue depth 16, fsync every 32", "--rw=randwrite --bs=4k --size=256M --ioengine=libaio --iodepth=16 --fsync=32 --runtime=5 --time_based", false, true},
}

// fioResult reads the figure out of fio's JSON.
func fioResult(out string, job fioJob) (float64, error) {
	i := strings.Index(out, "{")
	if i < 0 {
		return 0, fmt.Errorf("fio printed no json: %.300s", out)
	}
	var r struct {
		Jobs []struct {
			Read, Write struct {
				BW   float64 `json:"bw"` // KiB/s
				IOPS float64 `json:"iops"`
			}
		} `json:"jobs"`
	}
	if err := json.Unmarshal([]byte(out[i:]), &r); err != nil || len(r.Jobs) == 0 {
		return 0, fmt.Errorf("fio json: %v: %.300s", err, out[i:])
	}
	side := r.Jobs[0].Write
	if job.read {
		side = r.Jobs[0].Read
	}
	if job.iops {
		return side.IOPS, nil
	}
	return side.BW / 1024, nil
}

func fioCommand(job fioJob) string {
	return "fio --name=bench --filename=/var/tmp/fio.dat --direct=1 --output-format=json " + job.args
}

// realDiskAndSnapshots boots one real guest under Vigil and one by hand,
// runs the same fio jobs in both, alternating, then takes quiesced and
// crash-consistent disk snapshots of each.
func (b *bench) realDiskAndSnapshots(ctx context.Context, image string, runs int) ([]row, error) {
	const name = "rgdisk"
	if _, err := b.c.CreateVM(ctx, api.VMCreateRequest{Name: name, Image: "bench-debian", MemoryBytes: realMem, CPUs: 1,
		DiskBytes: realDisk, UserData: realUserData, Start: true}); err != nil {
		return nil, err
	}
	defer b.c.DeleteVM(context.WithoutCancel(ctx), name, true)
	wctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	_, err := b.c.WaitGuest(wctx, name)
	cancel()
	if err != nil {
		return nil, err
	}
	bv, _, err := b.bareReal(ctx, image, "bare-rgdisk")
	if err != nil {
		return nil, err
	}
	defer func() { bv.qga.Close(); bv.vm.stop() }()

	// A fio run has a bounded time (a time-based job runs 5 s); past it
	// the run is taken as stalled.
	limit := func(cmd string) time.Duration {
		if strings.Contains(cmd, "--time_based") {
			return 2 * time.Minute
		}
		return 5 * time.Minute
	}
	vigilRun := func(cmd string) (string, error) {
		res, err := b.c.Exec(ctx, name, api.ExecRequest{Command: cmd, TimeoutSeconds: int(limit(cmd) / time.Second)})
		if err == nil && (res.ExitCode != 0 || res.Error != "") {
			err = fmt.Errorf("%s: exit %d %s: %.300s", cmd, res.ExitCode, res.Error, res.Output)
		}
		return res.Output, err
	}
	bareRun := func(cmd string) (string, error) {
		xctx, cancel := context.WithTimeout(ctx, limit(cmd))
		defer cancel()
		res, err := bv.qga.Exec(xctx, "/bin/sh", []string{"-c", cmd}, nil, nil, 1<<20)
		if err == nil && res.ExitCode != 0 {
			err = fmt.Errorf("%s: exit %d: %.300s", cmd, res.ExitCode, res.Stderr)
		}
		return string(res.Stdout), err
	}
	for _, run := range []func(string) (string, error){vigilRun, bareRun} {
		if _, err := run("command -v fio"); err != nil {
			return nil, fmt.Errorf("the Debian image lacks fio (rebuild it: make debian-image): %w", err)
		}
	}

	// A run that stalls is retried once, after a look at the guest (is
	// its agent answering, what its console says): twice this series
	// stopped at a random-read job whose guest's agent went silent, and
	// 240 runs of the same jobs outside the bench did not stall again.
	sideName := []string{"Vigil's guest", "the bare QEMU guest"}
	serial := []string{filepath.Join(b.dataDir, "host", "vms", name, "serial.log"), bv.vm.m.SerialLog()}
	alive := []func() error{
		func() error { _, err := vigilRun("true"); return err },
		func() error {
			pctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			return bv.qga.Ping(pctx)
		},
	}
	var stalls []string
	var rows []row
	for _, job := range fioJobs {
		fmt.Fprintf(os.Stderr, "vigil-bench: real guest disk: %s\n", job.name)
		var vigil, bare []float64
		for range runs {
			for side, run := range []func(string) (string, error){vigilRun, bareRun} {
				out, err := run(fioCommand(job))
				if err != nil {
					tail, _ := os.ReadFile(serial[side])
					stall := fmt.Sprintf("%s, %s: %v; agent then: %v; console: %q", sideName[side], job.name, err, alive[side](), lastLines(string(tail), 5))
					fmt.Fprintf(os.Stderr, "vigil-bench: stalled run, retrying once: %s\n", stall)
					stalls = append(stalls, stall)
					out, err = run(fioCommand(job))
				}
				if err != nil {
					return rows, fmt.Errorf("%w (stalls: %s)", err, strings.Join(stalls, "; "))
				}
				v, err := fioResult(out, job)
				if err != nil {
					return rows, err
				}
				if side == 0 {
					vigil = append(vigil, v)
				} else {
					bare = append(bare, v)
				}
			}
		}
		unit := "MiB/s"
		if job.iops {
			unit = "IOPS"
		}
		// Throughput: higher is better, so p1 is the slow tail.
		rows = append(rows, row{
			what:     "Disk inside a real guest: " + job.name + fmt.Sprintf(" (%d runs)", runs),
			vigil:    pctF(vigil, unit),
			baseline: pctF(bare, unit) + " (bare QEMU, same image, overlay and cache mode)",
			ratio:    fmt.Sprintf("%.3f", pF(vigil, 50)/pF(bare, 50)),
			note:     "p50 ratio, higher is better (target ≥ 0.95)" + stallNote(stalls),
		})
		stalls = nil
	}

	// Disk snapshots of the running guest: quiesced (file systems frozen
	// through qemu-ga) and crash-consistent, by Vigil and by hand.
	fmt.Fprintf(os.Stderr, "vigil-bench: real guest snapshots\n")
	var vq, vqFrozen, vc, bq, bqFrozen, bc []time.Duration
	for i := range runs {
		s, err := b.c.CreateSnapshot(ctx, name, api.SnapshotCreateRequest{Name: fmt.Sprintf("q%d", i), NoMemory: true})
		if err != nil {
			return rows, err
		}
		if s.Consistency != "application" {
			return rows, fmt.Errorf("snapshot q%d is %s-consistent: %s", i, s.Consistency, s.Operation.Note)
		}
		vq = append(vq, msDur(s.Operation.DurationMS))
		vqFrozen = append(vqFrozen, msDur(s.Operation.FrozenMS))
		s, err = b.c.CreateSnapshot(ctx, name, api.SnapshotCreateRequest{Name: fmt.Sprintf("c%d", i), NoMemory: true, NoQuiesce: true})
		if err != nil {
			return rows, err
		}
		vc = append(vc, msDur(s.Operation.DurationMS))

		t0 := time.Now()
		fctx, cancel := context.WithTimeout(ctx, time.Minute)
		if _, err := bv.qga.FSFreeze(fctx); err != nil {
			cancel()
			return rows, fmt.Errorf("bare fsfreeze: %w", err)
		}
		serr := bv.vm.mon.Run(fctx, "blockdev-snapshot-internal-sync", map[string]any{"device": "disk0", "name": fmt.Sprintf("q%d", i)}, nil)
		_, terr := bv.qga.FSThaw(fctx)
		cancel()
		if serr != nil || terr != nil {
			return rows, fmt.Errorf("bare quiesced snapshot: %v, thaw %v", serr, terr)
		}
		bq = append(bq, time.Since(t0))
		bqFrozen = append(bqFrozen, time.Since(t0))
		t0 = time.Now()
		if err := bv.vm.mon.Run(ctx, "blockdev-snapshot-internal-sync", map[string]any{"device": "disk0", "name": fmt.Sprintf("c%d", i)}, nil); err != nil {
			return rows, err
		}
		bc = append(bc, time.Since(t0))
	}
	rows = append(rows,
		row{what: fmt.Sprintf("Quiesced disk snapshot of a running real guest: total (%d runs)", runs), vigil: pct(vq),
			baseline: pct(bq) + " (by hand: guest-fsfreeze-freeze, QMP blockdev-snapshot-internal-sync, guest-fsfreeze-thaw)",
			ratio:    fmt.Sprintf("%.2f", float64(p(vq, 50))/float64(p(bq, 50))), note: "p50 ratio"},
		row{what: "Quiesced disk snapshot: guest file systems frozen (writes wait; CPUs never paused)", vigil: pct(vqFrozen),
			baseline: pct(bqFrozen) + " (by hand, as above)",
			ratio:    fmt.Sprintf("%.2f", float64(p(vqFrozen, 50))/float64(p(bqFrozen, 50))), note: "p50 ratio"},
		row{what: "Crash-consistent disk snapshot of the same guest: total (`--no-quiesce`)", vigil: pct(vc),
			baseline: pct(bc) + " (by hand: QMP blockdev-snapshot-internal-sync)",
			ratio:    fmt.Sprintf("%.2f", float64(p(vc, 50))/float64(p(bc, 50))),
			note:     fmt.Sprintf("p50 ratio; quiescing costs %+.0f ms at p50 over crash-consistent", float64(p(vq, 50)-p(vc, 50))/float64(time.Millisecond))},
	)
	return rows, nil
}

func msDur(ms float64) time.Duration { return time.Duration(ms * float64(time.Millisecond)) }

// pF is the q-th percentile of a throughput series.
func pF(xs []float64, q int) float64 {
	ds := make([]time.Duration, len(xs))
	for i, x := range xs {
		ds[i] = time.Duration(x * 1000)
	}
	return float64(p(ds, q)) / 1000
}

// pctF reports a throughput series: its median and its slow tail (p1, the
// counterpart of a latency's p99).
func pctF(xs []float64, unit string) string {
	return fmt.Sprintf("p50 %.1f %s, p1 %.1f %s", pF(xs, 50), unit, pF(xs, 1), unit)
}

// stallNote says in a row's note which runs stalled and were run again.
func stallNote(stalls []string) string {
	if len(stalls) == 0 {
		return ""
	}
	return fmt.Sprintf("; %d run(s) stalled and were run again: %s", len(stalls), strings.Join(stalls, "; "))
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], " | ")
}
