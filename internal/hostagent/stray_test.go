package hostagent

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vigil-project/vigil/internal/hostproto"
	"github.com/vigil-project/vigil/internal/qemu"
)

// fakeQEMU starts a process whose command line names the QMP socket of VM
// directory dir, as a QEMU of that VM's does, and records its pid in
// dir/qemu.pid. It blocks reading stdin; the test ends it.
func fakeQEMU(t *testing.T, dir string) *exec.Cmd {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := &exec.Cmd{Path: "/bin/sh", Args: []string{"qemu-system-x86_64", "-c", "read x", "qemu-system-x86_64",
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
	pid := strconv.Itoa(cmd.Process.Pid)
	for deadline := time.Now().Add(5 * time.Second); ; {
		b, _ := os.ReadFile("/proc/" + pid + "/cmdline")
		if strings.HasPrefix(string(b), "qemu-system-x86_64\x00") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("fake qemu did not start: cmdline %q", b)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err := os.WriteFile(filepath.Join(dir, "qemu.pid"), []byte(pid+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return cmd
}

func writeSpec(t *testing.T, dir string, s hostproto.VMSpec) {
	t.Helper()
	b, _ := json.Marshal(s)
	if err := os.WriteFile(filepath.Join(dir, "spec.json"), b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestRecoverFencesUnadoptedQEMU: after an agent restart, every QEMU of
// this data dir that the agent did not adopt runs unmanaged; it is killed,
// each with its reason, and nothing else is touched.
func TestRecoverFencesUnadoptedQEMU(t *testing.T) {
	a, rec := newBareAgent(t)
	vms := filepath.Join(a.cfg.DataDir, "vms")

	noSpec := fakeQEMU(t, filepath.Join(vms, "nospec"))
	os.WriteFile(filepath.Join(vms, "nospec", "spec.json"), []byte("{torn"), 0o644)

	otherPool := fakeQEMU(t, filepath.Join(vms, "pooled"))
	s := spec("pooled", 64<<20)
	s.Pool, s.Epoch = "pool-elsewhere", 3
	writeSpec(t, filepath.Join(vms, "pooled"), s)

	// Its QMP socket answers nothing: adoption fails.
	noQMP := fakeQEMU(t, filepath.Join(vms, "local"))
	writeSpec(t, filepath.Join(vms, "local"), spec("local", 64<<20))

	// Its directory is gone, its QEMU is not.
	noDir := fakeQEMU(t, filepath.Join(vms, "deleted"))
	os.RemoveAll(filepath.Join(vms, "deleted"))

	// Another data dir's QEMU is none of this agent's business.
	foreign := fakeQEMU(t, filepath.Join(t.TempDir(), "vms", "local"))

	ctx, cancel := context.WithTimeout(context.Background(), time.Second) // adoption gives up
	defer cancel()
	if err := a.Recover(ctx); err != nil {
		t.Fatalf("recover: %v", err)
	}
	for name, c := range map[string]*exec.Cmd{"nospec": noSpec, "pooled": otherPool, "local": noQMP, "deleted": noDir} {
		if qemu.Alive(c.Process.Pid) {
			t.Errorf("unadopted qemu of %s (pid %d) still runs", name, c.Process.Pid)
		}
	}
	if !qemu.Alive(foreign.Process.Pid) {
		t.Error("a qemu of another data dir was killed")
	}
	for _, reason := range []string{"no readable spec", "storage pool is not mounted", "adoption failed", "no vm directory"} {
		if rec.logged(reason) == 0 {
			t.Errorf("no log line with the reason %q:\n%s", reason, rec.log.String())
		}
	}
	if n := len(rec.of(hostproto.EventFenced)); n != 4 {
		t.Errorf("%d fenced events, want 4", n)
	}
}
