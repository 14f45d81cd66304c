package qemu

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// args joins a command line as /proc/PID/cmdline holds it.
func args(a ...string) []byte { return []byte(strings.Join(a, "\x00") + "\x00") }

func TestCmdlineNamesSocket(t *testing.T) {
	const sock = "/var/lib/vigil/vms/web1/qmp.sock"
	tests := []struct {
		name    string
		cmdline []byte
		want    bool
	}{
		{"qemu's -qmp", args("qemu-system-x86_64", "-qmp", "unix:"+sock+",server=on,wait=off"), true},
		{"a chardev path", args("qemu-system-x86_64", "-chardev", "socket,id=m,path="+sock+",server=on"), true},
		{"the bare path", args("qemu-system-x86_64", sock), true},
		{"another data dir ending the same", args("qemu-system-x86_64", "-qmp", "unix:/tmp"+sock+",server=on"), false},
		{"a longer vm name", args("qemu-system-x86_64", "-qmp", "unix:/var/lib/vigil/vms/web1/qmp.sock2,server=on"), false},
		{"another vm", args("qemu-system-x86_64", "-qmp", "unix:/var/lib/vigil/vms/web2/qmp.sock,server=on"), false},
		{"nothing", nil, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := cmdlineNamesSocket(tt.cmdline, sock); got != tt.want {
				t.Fatalf("cmdlineNamesSocket = %v, want %v", got, tt.want)
			}
		})
	}
}

func TestQMPDirUnder(t *testing.T) {
	const vms = "/var/lib/vigil/vms"
	tests := []struct {
		name    string
		cmdline []byte
		want    string
	}{
		{"our qemu", args("/usr/bin/qemu-system-x86_64", "-name", "guest=web1", "-qmp", "unix:"+vms+"/web1/qmp.sock,server=on,wait=off"), vms + "/web1"},
		{"another arch", args("qemu-system-aarch64", "-qmp", "unix:"+vms+"/db/qmp.sock,server=on,wait=off"), vms + "/db"},
		{"not qemu (a debugging socat)", args("socat", "-", "UNIX-CONNECT:"+vms+"/web1/qmp.sock"), ""},
		{"another data dir", args("qemu-system-x86_64", "-qmp", "unix:/srv"+vms+"/web1/qmp.sock,server=on"), ""},
		{"not directly under", args("qemu-system-x86_64", "-qmp", "unix:"+vms+"/a/b/qmp.sock,server=on"), ""},
		{"dot dot", args("qemu-system-x86_64", "-qmp", "unix:"+vms+"/../qmp.sock,server=on"), ""},
		{"no qmp", args("qemu-system-x86_64", "-m", "128M"), ""},
		{"empty", nil, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := qmpDirUnder(tt.cmdline, vms); got != tt.want {
				t.Fatalf("qmpDirUnder = %q, want %q", got, tt.want)
			}
		})
	}
}

// fakeQEMU starts a process that looks like a QEMU of VM directory dir to
// anyone reading its command line: argv[0] is argv0 and its arguments name
// dir's QMP socket. It blocks reading stdin; the test ends it.
func fakeQEMU(t *testing.T, argv0, dir string) *exec.Cmd {
	t.Helper()
	cmd := &exec.Cmd{Path: "/bin/sh", Args: []string{argv0, "-c", "read x", argv0,
		"-qmp", "unix:" + filepath.Join(dir, "qmp.sock") + ",server=on,wait=off"}}
	w, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		w.Close()
		cmd.Process.Kill()
		cmd.Wait()
	})
	// The command line is the child's once it has exec'd.
	deadline := time.Now().Add(5 * time.Second)
	for {
		b, _ := os.ReadFile("/proc/" + strconv.Itoa(cmd.Process.Pid) + "/cmdline")
		if strings.HasPrefix(string(b), argv0+"\x00") {
			return cmd
		}
		if time.Now().After(deadline) {
			t.Fatalf("fake qemu did not start: cmdline %q", b)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func writePID(t *testing.T, dir string, pid int) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, "qemu.pid"), []byte(strconv.Itoa(pid)+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestFindUnder(t *testing.T) {
	vms := filepath.Join(t.TempDir(), "vms")
	dir := func(name string) string {
		d := filepath.Join(vms, name)
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		return d
	}
	// Found by its pid file (and its command line).
	byPID := fakeQEMU(t, "qemu-system-x86_64", dir("bypid"))
	writePID(t, filepath.Join(vms, "bypid"), byPID.Process.Pid)
	// Found by its command line alone: no pid file.
	noPID := fakeQEMU(t, "qemu-system-x86_64", dir("nopid"))
	// Found by its pid file although not called qemu-system-*.
	renamed := fakeQEMU(t, "/opt/qemu/bin/kvm", dir("renamed"))
	writePID(t, filepath.Join(vms, "renamed"), renamed.Process.Pid)
	// A recycled pid: the pid file names a process that is not this VM's.
	other := fakeQEMU(t, "qemu-system-x86_64", filepath.Join(t.TempDir(), "elsewhere"))
	writePID(t, dir("recycled"), other.Process.Pid)
	// A stale pid file of a process long gone.
	writePID(t, dir("gone"), 0x7ffffff0)

	found, err := FindUnder(vms)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, f := range found {
		got = append(got, filepath.Base(f.Dir)+":"+strconv.Itoa(f.PID))
	}
	slices.Sort(got)
	want := []string{
		"bypid:" + strconv.Itoa(byPID.Process.Pid),
		"nopid:" + strconv.Itoa(noPID.Process.Pid),
		"renamed:" + strconv.Itoa(renamed.Process.Pid),
	}
	if !slices.Equal(got, want) {
		t.Fatalf("FindUnder = %v, want %v", got, want)
	}

	// Killing checks the command line again and waits for the end.
	for _, f := range found {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err := KillFound(ctx, f)
		cancel()
		if err != nil {
			t.Fatalf("kill %+v: %v", f, err)
		}
	}
	for _, c := range []*exec.Cmd{byPID, noPID, renamed} {
		if Alive(c.Process.Pid) {
			t.Fatalf("pid %d still alive", c.Process.Pid)
		}
	}
	if !Alive(other.Process.Pid) {
		t.Fatal("the process behind a recycled pid was killed")
	}
	// A Found whose pid now belongs to someone else is left alone.
	if err := KillFound(context.Background(), Found{PID: other.Process.Pid, Dir: filepath.Join(vms, "recycled")}); err != nil || !Alive(other.Process.Pid) {
		t.Fatalf("kill of a recycled pid: %v, alive %v", err, Alive(other.Process.Pid))
	}
}
