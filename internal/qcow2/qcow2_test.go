package qcow2

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

const mib = 1 << 20

// needTools makes sure the named QEMU programs are installed. Missing tools
// skip the test only under -short; otherwise the test fails with a hint.
func needTools(t testing.TB, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			if testing.Short() {
				t.Skipf("%s not installed (skipped under -short)", tool)
			}
			t.Fatalf("%s not found in PATH: install it (Debian: apt-get install qemu-utils qemu-system-x86) or run go test -short", tool)
		}
	}
}

func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// createImage creates a 64 MiB qcow2 image with the given -o options.
func createImage(t testing.TB, dir, opts string) string {
	t.Helper()
	img := filepath.Join(dir, "disk.qcow2")
	args := []string{"create", "-q", "-f", "qcow2"}
	if opts != "" {
		args = append(args, "-o", opts)
	}
	run(t, "qemu-img", append(args, img, "64M")...)
	return img
}

func mustInspect(t testing.TB, img string) *Usage {
	t.Helper()
	u, err := Inspect(img)
	if err != nil {
		t.Fatalf("Inspect(%s): %v", img, err)
	}
	return u
}

type qemuCheck struct {
	ImageEndOffset    int64 `json:"image-end-offset"`
	AllocatedClusters int64 `json:"allocated-clusters"`
	CompressedCluster int64 `json:"compressed-clusters"`
	CheckErrors       int64 `json:"check-errors"`
}

func checkImage(t testing.TB, img string) qemuCheck {
	t.Helper()
	var c qemuCheck
	out := run(t, "qemu-img", "check", "--output=json", img)
	if err := json.Unmarshal([]byte(out), &c); err != nil {
		t.Fatalf("qemu-img check output: %v\n%s", err, out)
	}
	if c.CheckErrors != 0 {
		t.Fatalf("qemu-img check reports %d errors", c.CheckErrors)
	}
	return c
}

type qemuSnapshot struct {
	ID          string `json:"id"`
	Name        string `json:"name"`
	VMStateSize int64  `json:"vm-state-size"`
	DateSec     int64  `json:"date-sec"`
	DateNsec    int64  `json:"date-nsec"`
}

func qemuSnapshots(t testing.TB, img string) []qemuSnapshot {
	t.Helper()
	var info struct {
		Snapshots []qemuSnapshot `json:"snapshots"`
	}
	out := run(t, "qemu-img", "info", "-U", "--output=json", img)
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("qemu-img info output: %v\n%s", err, out)
	}
	return info.Snapshots
}

// crossCheck compares u with what qemu-img reports for the same image.
func crossCheck(t testing.TB, img string, u *Usage, compressed bool) {
	t.Helper()
	c := checkImage(t, img)
	// allocated-clusters counts the active image's guest clusters that own
	// a host cluster (data or preallocated zero), one per guest cluster.
	if !compressed && u.ActiveBytes != c.AllocatedClusters*u.ClusterSize {
		t.Fatalf("ActiveBytes %d, qemu-img check: %d allocated clusters = %d bytes",
			u.ActiveBytes, c.AllocatedClusters, c.AllocatedClusters*u.ClusterSize)
	}
	if compressed && u.ActiveBytes > c.AllocatedClusters*u.ClusterSize {
		t.Fatalf("ActiveBytes %d exceeds the %d guest clusters allocated", u.ActiveBytes, c.AllocatedClusters)
	}
	if total := u.ActiveBytes + u.TotalExclusiveBytes(); total > c.ImageEndOffset {
		t.Fatalf("active %d + exclusive %d = %d exceeds image end offset %d",
			u.ActiveBytes, u.TotalExclusiveBytes(), total, c.ImageEndOffset)
	}
	qs := qemuSnapshots(t, img)
	if len(qs) != len(u.Snapshots) {
		t.Fatalf("%d snapshots, qemu-img info lists %d", len(u.Snapshots), len(qs))
	}
	for i, q := range qs {
		s := u.Snapshots[i]
		if s.ID != q.ID || s.Name != q.Name || s.VMStateSize != q.VMStateSize ||
			!s.Date.Equal(time.Unix(q.DateSec, q.DateNsec)) {
			t.Fatalf("snapshot %d: got %+v, qemu-img info says %+v", i, s, q)
		}
		if s.ExclusiveBytes > s.ReferencedBytes || s.ExclusiveBytes < 0 {
			t.Fatalf("snapshot %q: exclusive %d, referenced %d", s.Name, s.ExclusiveBytes, s.ReferencedBytes)
		}
		if s.DiskSize != 64*mib {
			t.Fatalf("snapshot %q: DiskSize %d", s.Name, s.DiskSize)
		}
	}
}

type snapWant struct {
	name      string
	ref, excl int64
}

type step struct {
	name   string
	cmds   [][]string // "IMG" is replaced by the image path
	active int64
	snaps  []snapWant
	v3only bool // relies on zero clusters (not in compat=0.10 images)
}

func qio(cmd string) []string    { return []string{"qemu-io", "-c", cmd, "IMG"} }
func snapC(name string) []string { return []string{"qemu-img", "snapshot", "-c", name, "IMG"} }
func snapD(name string) []string { return []string{"qemu-img", "snapshot", "-d", name, "IMG"} }

var scenario = []step{
	{name: "empty", active: 0},
	{name: "write 4M", cmds: [][]string{qio("write -P 0xaa 0 4M")}, active: 4 * mib},
	{name: "snapshot s1", cmds: [][]string{snapC("s1")}, active: 4 * mib,
		snaps: []snapWant{{"s1", 4 * mib, 0}}},
	{name: "overwrite 1M", cmds: [][]string{qio("write -P 0xbb 0 1M")}, active: 4 * mib,
		snaps: []snapWant{{"s1", 4 * mib, 1 * mib}}},
	{name: "write 2M at 8M", cmds: [][]string{qio("write -P 0xcc 8M 2M")}, active: 6 * mib,
		snaps: []snapWant{{"s1", 4 * mib, 1 * mib}}},
	// s2 holds 1M of 0xbb (shared with active), 3M of 0xaa (shared with
	// s1 and active) and 2M of 0xcc (shared with active).
	{name: "snapshot s2", cmds: [][]string{snapC("s2")}, active: 6 * mib,
		snaps: []snapWant{{"s1", 4 * mib, 1 * mib}, {"s2", 6 * mib, 0}}},
	// The old 0xcc clusters now belong to s2 alone; 0xbb is still shared
	// by s2 and the active image.
	{name: "overwrite 2M at 8M", cmds: [][]string{qio("write -P 0xdd 8M 2M")}, active: 6 * mib,
		snaps: []snapWant{{"s1", 4 * mib, 1 * mib}, {"s2", 6 * mib, 2 * mib}}},
	{name: "delete s1", cmds: [][]string{snapD("s1")}, active: 6 * mib,
		snaps: []snapWant{{"s2", 6 * mib, 2 * mib}}},
	// Zero with unmap drops the active image's reference to 0xbb: s2 alone
	// holds it now.
	{name: "write -z -u 1M", cmds: [][]string{qio("write -z -u 0 1M")}, active: 5 * mib, v3only: true,
		snaps: []snapWant{{"s2", 6 * mib, 3 * mib}}},
	{name: "discard 1M", cmds: [][]string{qio("discard 2M 1M")}, active: 4 * mib, v3only: true,
		snaps: []snapWant{{"s2", 6 * mib, 4 * mib}}},
	// Zero without unmap keeps the (shared) host clusters preallocated.
	{name: "write -z 1M", cmds: [][]string{qio("write -z 3M 1M")}, active: 4 * mib, v3only: true,
		snaps: []snapWant{{"s2", 6 * mib, 4 * mib}}},
	// s3 shares 1M-2M and 3M-4M of 0xaa with s2 and holds 0xdd alone once
	// the active image is rewritten.
	{name: "snapshot s3 then rewrite all", cmds: [][]string{snapC("s3"), qio("write -P 0xee 0 16M")}, active: 16 * mib, v3only: true,
		snaps: []snapWant{{"s2", 6 * mib, 4 * mib}, {"s3", 4 * mib, 2 * mib}}},
}

func TestScenario(t *testing.T) {
	needTools(t, "qemu-img", "qemu-io")
	variants := []struct {
		name string
		opts string
		v2   bool
	}{
		{"64k", "", false},
		{"4k", "cluster_size=4096", false},
		{"extended_l2", "extended_l2=on", false},
		{"compat-0.10", "compat=0.10", true},
		{"compat-0.10-4k", "compat=0.10,cluster_size=4096", true},
	}
	for _, v := range variants {
		t.Run(v.name, func(t *testing.T) {
			t.Parallel()
			img := createImage(t, t.TempDir(), v.opts)
			for _, st := range scenario {
				if st.v3only && v.v2 {
					continue
				}
				for _, c := range st.cmds {
					args := make([]string, len(c)-1)
					for i, a := range c[1:] {
						args[i] = strings.ReplaceAll(a, "IMG", img)
					}
					run(t, c[0], args...)
				}
				u := mustInspect(t, img)
				names, err := SnapshotNames(img)
				if err != nil || len(names) != len(u.Snapshots) {
					t.Fatalf("%s: SnapshotNames = %v, %v; Inspect has %d", st.name, names, err, len(u.Snapshots))
				}
				for i, n := range names {
					if n != u.Snapshots[i].Name {
						t.Fatalf("%s: SnapshotNames[%d] = %q, Inspect says %q", st.name, i, n, u.Snapshots[i].Name)
					}
				}
				if u.ActiveBytes != st.active {
					t.Fatalf("%s: ActiveBytes = %d, want %d", st.name, u.ActiveBytes, st.active)
				}
				if len(u.Snapshots) != len(st.snaps) {
					t.Fatalf("%s: %d snapshots %+v, want %d", st.name, len(u.Snapshots), u.Snapshots, len(st.snaps))
				}
				for i, w := range st.snaps {
					s := u.Snapshots[i]
					if s.Name != w.name || s.ReferencedBytes != w.ref || s.ExclusiveBytes != w.excl {
						t.Fatalf("%s: snapshot %d = %s ref %d excl %d, want %s ref %d excl %d",
							st.name, i, s.Name, s.ReferencedBytes, s.ExclusiveBytes, w.name, w.ref, w.excl)
					}
					if s.VMStateSize != 0 {
						t.Fatalf("%s: snapshot %s VMStateSize %d, want 0", st.name, s.Name, s.VMStateSize)
					}
				}
				crossCheck(t, img, u, false)
				if fi, err := os.Stat(img); err != nil || fi.Size() != u.FileSize {
					t.Fatalf("%s: FileSize %d, stat %v %v", st.name, u.FileSize, fi.Size(), err)
				}
			}
		})
	}
}

func TestCompressed(t *testing.T) {
	needTools(t, "qemu-img", "qemu-io")
	for _, cs := range []string{"65536", "4096"} {
		t.Run(cs, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			src := filepath.Join(dir, "src.raw")
			run(t, "qemu-img", "create", "-q", "-f", "raw", src, "64M")
			// Compressible and incompressible data.
			run(t, "qemu-io", "-f", "raw", "-c", "write -P 0xaa 0 4M", src)
			rnd := make([]byte, 1*mib)
			for i := range rnd {
				rnd[i] = byte((i*2654435761)>>13 ^ i>>3)
			}
			f, err := os.OpenFile(src, os.O_WRONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := f.WriteAt(rnd, 8*mib); err != nil {
				t.Fatal(err)
			}
			f.Close()
			img := filepath.Join(dir, "c.qcow2")
			run(t, "qemu-img", "convert", "-c", "-O", "qcow2", "-o", "cluster_size="+cs, src, img)

			u := mustInspect(t, img)
			c := checkImage(t, img)
			if c.CompressedCluster == 0 {
				t.Fatalf("qemu-img convert -c produced no compressed clusters: %+v", c)
			}
			if u.ActiveBytes <= 0 || u.ActiveBytes >= 5*mib || u.ActiveBytes > u.FileSize {
				t.Fatalf("compressed ActiveBytes = %d (file %d)", u.ActiveBytes, u.FileSize)
			}
			crossCheck(t, img, u, true)
			before := u.ActiveBytes

			// A snapshot shares everything; rewriting the whole disk leaves the
			// compressed streams to the snapshot alone.
			run(t, "qemu-img", "snapshot", "-c", "s1", img)
			u = mustInspect(t, img)
			if s := u.Snapshots[0]; s.ReferencedBytes != before || s.ExclusiveBytes != 0 || u.ActiveBytes != before {
				t.Fatalf("after snapshot: active %d, s1 %+v, want ref %d excl 0", u.ActiveBytes, s, before)
			}
			run(t, "qemu-io", "-c", "write -P 0x11 0 16M", img)
			u = mustInspect(t, img)
			if s := u.Snapshots[0]; s.ReferencedBytes != before || s.ExclusiveBytes != before || u.ActiveBytes != 16*mib {
				t.Fatalf("after rewrite: active %d, s1 %+v, want ref=excl=%d", u.ActiveBytes, s, before)
			}
			crossCheck(t, img, u, false)

			// A compressed write into the active image (qemu-io write -c) is a
			// single stream that replaces one standard cluster.
			run(t, "qemu-io", "-c", "write -c -P 0x22 32M "+cs, img)
			u = mustInspect(t, img)
			if u.ActiveBytes <= 16*mib || u.ActiveBytes >= 16*mib+512*8 {
				t.Fatalf("after compressed write: active %d", u.ActiveBytes)
			}
		})
	}
}

func TestErrors(t *testing.T) {
	dir := t.TempDir()
	write := func(name string, data []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	v1 := make([]byte, 512)
	copy(v1, magic)
	binary.BigEndian.PutUint32(v1[4:], 1)
	v4 := make([]byte, 512)
	copy(v4, magic)
	binary.BigEndian.PutUint32(v4[4:], 4)
	tests := []struct {
		name string
		path string
		want error
	}{
		{"raw", write("raw.img", make([]byte, 1*mib)), ErrNotQcow2},
		{"empty file", write("empty.img", nil), ErrNotQcow2},
		{"short magic", write("short.img", []byte("QF")), ErrNotQcow2},
		{"version 1", write("v1.img", v1), ErrUnsupported},
		{"version 4", write("v4.img", v4), ErrUnsupported},
		{"magic only", write("magic.img", []byte(magic)), ErrCorrupt},
		{"missing", filepath.Join(dir, "nope.qcow2"), fs.ErrNotExist},
		{"directory", dir, ErrNotQcow2},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			u, err := Inspect(tc.path)
			if !errors.Is(err, tc.want) || u != nil {
				t.Fatalf("Inspect = %v, %v; want error %v", u, err, tc.want)
			}
			if tc.want != fs.ErrNotExist && !strings.Contains(err.Error(), tc.path) {
				t.Fatalf("error %q does not name the file", err)
			}
			if msg := err.Error(); msg != strings.ToLower(msg[:1])+msg[1:] {
				t.Fatalf("error %q is not lower-case", msg)
			}
		})
	}
}

func TestUnsupportedFeatures(t *testing.T) {
	needTools(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	img := filepath.Join(dir, "ext.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file="+filepath.Join(dir, "ext.raw"), img, "16M")
	if _, err := Inspect(img); !errors.Is(err, ErrUnsupported) {
		t.Fatalf("external data file: err = %v, want ErrUnsupported", err)
	}

	// Unknown incompatible feature bit.
	img2 := createImage(t, t.TempDir(), "")
	patch(t, img2, 72, func(b []byte) { binary.BigEndian.PutUint64(b, 1<<40) })
	if _, err := Inspect(img2); !errors.Is(err, ErrUnsupported) {
		t.Fatalf("unknown incompatible bit: err = %v, want ErrUnsupported", err)
	}
}

func TestEncrypted(t *testing.T) {
	needTools(t, "qemu-img", "qemu-io")
	img := filepath.Join(t.TempDir(), "enc.qcow2")
	secret := "secret,id=sec0,data=vigil"
	// qemu-img times PBKDF2 with getrusage to pick the iteration count; on
	// a loaded machine with coarse CPU accounting it can measure zero and
	// give up ("Unable to get accurate CPU usage"). That is about the
	// machine, not the image: try again.
	for attempt := 1; ; attempt++ {
		out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "--object", secret,
			"-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10", img, "64M").CombinedOutput()
		if err == nil {
			break
		}
		if attempt == 5 || !strings.Contains(string(out), "accurate CPU usage") {
			t.Fatalf("qemu-img create (encrypted): %v\n%s", err, out)
		}
		os.Remove(img)
	}
	run(t, "qemu-io", "--object", secret, "--image-opts",
		"-c", "write -P 0xaa 0 2M",
		"driver=qcow2,file.filename="+img+",encrypt.key-secret=sec0")
	u := mustInspect(t, img)
	if u.ActiveBytes != 2*mib {
		t.Fatalf("encrypted image: ActiveBytes %d, want %d", u.ActiveBytes, 2*mib)
	}
}

// patch rewrites 8 bytes of the file at off.
func patch(t testing.TB, path string, off int64, fn func([]byte)) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 8)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	fn(b)
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

func TestTruncated(t *testing.T) {
	needTools(t, "qemu-img", "qemu-io")
	img := createImage(t, t.TempDir(), "cluster_size=4096")
	run(t, "qemu-io", "-c", "write -P 0xaa 0 4M", img)
	run(t, "qemu-img", "snapshot", "-c", "s1", img)
	run(t, "qemu-io", "-c", "write -P 0xbb 0 4M", img)
	data, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	full := mustInspect(t, img)
	if full.ActiveBytes != 4*mib || full.Snapshots[0].ExclusiveBytes != 4*mib {
		t.Fatalf("before truncation: %+v", full)
	}
	for _, n := range []int{4, 50, 71, 100, 4096, 4096*3 + 8, len(data) / 2, len(data) - 4*mib - 4096} {
		p := filepath.Join(t.TempDir(), "trunc.qcow2")
		if err := os.WriteFile(p, data[:n], 0o644); err != nil {
			t.Fatal(err)
		}
		if u, err := Inspect(p); err == nil {
			t.Fatalf("truncated to %d bytes: no error, %+v", n, u)
		} else if !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrNotQcow2) {
			t.Fatalf("truncated to %d bytes: %v", n, err)
		}
	}
}

// TestLiveImage inspects an image held open (and locked) by a running QEMU,
// taking snapshots through QMP as Vigil does.
func TestLiveImage(t *testing.T) {
	needTools(t, "qemu-img", "qemu-io", "qemu-system-x86_64")
	dir := t.TempDir()
	img := createImage(t, dir, "")
	run(t, "qemu-io", "-c", "write -P 0xaa 0 4M", img)

	sock := filepath.Join(dir, "qmp.sock")
	cmd := exec.Command("qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
		"-qmp", "unix:"+sock+",server=on,wait=off",
		"-blockdev", "driver=file,filename="+img+",node-name=f",
		"-blockdev", "driver=qcow2,file=f,node-name=d")
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start qemu: %v", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
	})

	q := dialQMP(t, sock, exited, &stderr)
	defer q.conn.Close()

	// The image is locked by QEMU: qemu-img info without -U must fail.
	if out, err := exec.Command("qemu-img", "info", img).CombinedOutput(); err == nil {
		t.Fatalf("qemu-img info succeeded on an image QEMU has open (lock not held?):\n%s", out)
	}
	u := mustInspect(t, img)
	if u.ActiveBytes != 4*mib || len(u.Snapshots) != 0 {
		t.Fatalf("live: %+v", u)
	}

	q.exec(t, "blockdev-snapshot-internal-sync", map[string]any{"device": "d", "name": "live1"})
	q.hmp(t, `qemu-io d "write -P 0x77 0 1M"`)
	q.exec(t, "blockdev-snapshot-internal-sync", map[string]any{"device": "d", "name": "live2"})
	q.hmp(t, "savevm vm1")

	// QEMU drops the VM state clusters from the active table right after
	// savevm, but keeps that change in its L2 cache: until a flush, the
	// on-disk active table may still reference them.
	u = mustInspect(t, img)
	if len(u.Snapshots) != 3 || u.Snapshots[2].VMStateSize <= 0 {
		t.Fatalf("live, before flush: %+v", u)
	}
	q.hmp(t, `qemu-io d "flush"`)
	u = mustInspect(t, img)
	if len(u.Snapshots) != 3 {
		t.Fatalf("live: snapshots %+v", u.Snapshots)
	}
	live1, live2, vm1 := u.Snapshots[0], u.Snapshots[1], u.Snapshots[2]
	if live1.Name != "live1" || live1.ReferencedBytes != 4*mib || live1.ExclusiveBytes != 1*mib {
		t.Fatalf("live1: %+v", live1)
	}
	if live2.Name != "live2" || live2.ReferencedBytes != 4*mib || live2.ExclusiveBytes != 0 {
		t.Fatalf("live2: %+v", live2)
	}
	// The VM state lives in clusters only vm1's L1 table references.
	vmClusters := (vm1.VMStateSize + u.ClusterSize - 1) / u.ClusterSize * u.ClusterSize
	if vm1.Name != "vm1" || vm1.VMStateSize <= 0 || vm1.ExclusiveBytes != vmClusters ||
		vm1.ReferencedBytes != 4*mib+vmClusters {
		t.Fatalf("vm1: %+v", vm1)
	}
	if u.ActiveBytes != 4*mib {
		t.Fatalf("live ActiveBytes %d", u.ActiveBytes)
	}
	qs := qemuSnapshots(t, img) // -U: shared access
	if len(qs) != 3 || qs[2].VMStateSize != vm1.VMStateSize {
		t.Fatalf("qemu-img info -U snapshots %+v, ours %+v", qs, u.Snapshots)
	}
}

type qmpConn struct {
	conn net.Conn
	rd   *bufio.Reader
}

func dialQMP(t *testing.T, sock string, exited chan error, stderr *strings.Builder) *qmpConn {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		conn, err := net.Dial("unix", sock)
		if err == nil {
			_ = conn.SetDeadline(time.Now().Add(60 * time.Second))
			q := &qmpConn{conn: conn, rd: bufio.NewReader(conn)}
			if _, err := q.rd.ReadBytes('\n'); err != nil { // greeting
				t.Fatalf("qmp greeting: %v", err)
			}
			q.exec(t, "qmp_capabilities", nil)
			return q
		}
		select {
		case err := <-exited:
			t.Fatalf("qemu exited: %v\n%s", err, stderr.String())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("qmp socket %s: %v\n%s", sock, err, stderr.String())
		}
	}
}

func (q *qmpConn) exec(t *testing.T, cmd string, args map[string]any) json.RawMessage {
	t.Helper()
	req := map[string]any{"execute": cmd}
	if args != nil {
		req["arguments"] = args
	}
	b, _ := json.Marshal(req)
	if _, err := q.conn.Write(append(b, '\n')); err != nil {
		t.Fatalf("qmp %s: %v", cmd, err)
	}
	for {
		line, err := q.rd.ReadBytes('\n')
		if err != nil {
			t.Fatalf("qmp %s: %v", cmd, err)
		}
		var resp struct {
			Return json.RawMessage `json:"return"`
			Error  *struct {
				Desc string `json:"desc"`
			} `json:"error"`
		}
		if err := json.Unmarshal(line, &resp); err != nil {
			t.Fatalf("qmp %s: %v: %s", cmd, err, line)
		}
		if resp.Error != nil {
			t.Fatalf("qmp %s: %s", cmd, resp.Error.Desc)
		}
		if resp.Return != nil {
			return resp.Return
		}
		// An event: keep reading.
	}
}

func (q *qmpConn) hmp(t *testing.T, line string) {
	t.Helper()
	var out string
	if err := json.Unmarshal(q.exec(t, "human-monitor-command", map[string]any{"command-line": line}), &out); err != nil {
		t.Fatalf("hmp %s: %v", line, err)
	}
	if strings.Contains(strings.ToLower(out), "error") {
		t.Fatalf("hmp %s: %s", line, out)
	}
}

// seedImages builds small images for the fuzz corpus (4 KiB clusters).
func seedImages(f *testing.F) [][]byte {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		return nil
	}
	if _, err := exec.LookPath("qemu-io"); err != nil {
		return nil
	}
	var seeds [][]byte
	for i, opts := range []string{"cluster_size=4096", "cluster_size=16384,extended_l2=on", "compat=0.10,cluster_size=4096"} {
		dir := f.TempDir()
		img := filepath.Join(dir, fmt.Sprintf("seed%d.qcow2", i))
		run(f, "qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, img, "1M")
		run(f, "qemu-io", "-c", "write -P 0xaa 0 64k", img)
		run(f, "qemu-img", "snapshot", "-c", "s1", img)
		run(f, "qemu-io", "-c", "write -P 0xbb 0 16k", "-c", "write -c -P 0xcc 128k 16k", img)
		if !strings.Contains(opts, "compat") {
			run(f, "qemu-io", "-c", "write -z 64k 16k", img)
		}
		data, err := os.ReadFile(img)
		if err != nil {
			f.Fatal(err)
		}
		seeds = append(seeds, data)
	}
	return seeds
}

func FuzzInspect(f *testing.F) {
	for _, s := range seedImages(f) {
		f.Add(s)
	}
	hdr := make([]byte, 104)
	copy(hdr, magic)
	binary.BigEndian.PutUint32(hdr[4:], 3)
	binary.BigEndian.PutUint32(hdr[20:], 9)
	f.Add(hdr)
	f.Add([]byte(magic))
	f.Fuzz(func(t *testing.T, data []byte) {
		// In memory: the same parser as Inspect, without the file system
		// (which stalls Go's fuzzing workers on this kind of machine).
		u, err := inspectFile(memImage{bytes.NewReader(data)}, "fuzz.qcow2", int64(len(data)))
		if err != nil {
			if u != nil {
				t.Fatalf("non-nil usage with error %v", err)
			}
			return
		}
		if u.ActiveBytes < 0 {
			t.Fatalf("negative ActiveBytes %d", u.ActiveBytes)
		}
		for _, s := range u.Snapshots {
			if s.ExclusiveBytes < 0 || s.ExclusiveBytes > s.ReferencedBytes {
				t.Fatalf("snapshot %+v", s)
			}
		}
	})
}

// memImage is an image in memory, for the fuzzer.
type memImage struct{ *bytes.Reader }

func (m memImage) Stat() (fs.FileInfo, error) { return memInfo{m.Size()}, nil }

type memInfo struct{ size int64 }

func (i memInfo) Name() string       { return "mem.qcow2" }
func (i memInfo) Size() int64        { return i.size }
func (i memInfo) Mode() fs.FileMode  { return 0o644 }
func (i memInfo) ModTime() time.Time { return time.Time{} }
func (i memInfo) IsDir() bool        { return false }
func (i memInfo) Sys() any           { return nil }
