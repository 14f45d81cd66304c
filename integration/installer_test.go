package integration

import (
	"bufio"
	"bytes"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vigil-project/vigil/api"
)

// installerISO is Debian's netboot installer wrapped in a bootable ISO
// (scripts/build-installer-iso.sh; make test sets it).
var installerISO = os.Getenv("VIGIL_INSTALLER_ISO")

// TestInstallerISO is the seed's scenario: an operating system installer
// booted from an ISO, suspended to disk in the middle (the kernel is up,
// the installer is still loading), the agent restarted, and resumed: the
// installation carries on to its first dialog without booting again. The
// guest has no agent, so being idle at a prompt is not a hang. Its screen
// is reachable through the API only: a screenshot, and VNC tunnelled by
// the CLI.
func TestInstallerISO(t *testing.T) {
	needIntegration(t)
	if installerISO == "" {
		if os.Getenv("CI") == "true" {
			t.Fatal("VIGIL_INSTALLER_ISO is not set in CI: make test builds the ISO and sets it")
		}
		t.Skip("no installer ISO: run make test, or set VIGIL_INSTALLER_ISO to scripts/build-installer-iso.sh's output")
	}
	a := newDevAgent(t)
	var img api.Image
	json.Unmarshal([]byte(mustVigilFor(t, a, 2*time.Minute, "image", "import", "installer", installerISO, "-o", "json")), &img)
	if img.Format != "iso" {
		t.Fatalf("imported installer: %+v", img)
	}
	var v api.VM
	json.Unmarshal([]byte(a.mustVigil("vm", "create", "inst", "--iso", "installer", "--start", "--hang-timeout", "3s", "--min-uptime", "5s", "-o", "json")), &v)
	if v.ISO != "installer" || v.DiskBytes != 8<<30 || v.MemoryBytes != 1<<30 {
		t.Fatalf("installer vm: %+v", v)
	}
	console := func() string { return a.mustVigil("vm", "console", "inst") }
	started := time.Now()
	waitFor(t, "the installer's kernel", 3*time.Minute, func() bool { return strings.Contains(console(), "Linux version") })
	t.Logf("installer kernel up after %s", time.Since(started).Round(time.Millisecond))
	if strings.Contains(console(), "Select a language") {
		t.Skip("the installer reached its dialog before it could be suspended (machine too fast for this test)")
	}

	// Suspend in the middle of the installation, restart the agent, resume.
	a.mustVigil("vm", "pause", "inst", "--to-disk")
	if v := showVM(t, a, "inst"); v.State != api.StateSuspended {
		t.Fatalf("after pause --to-disk: %s", v.State)
	}
	a.kill()
	a.start()
	a.mustVigil("vm", "resume", "inst")
	resumed := time.Now()
	waitFor(t, "the installer's first dialog", 5*time.Minute, func() bool { return strings.Contains(console(), "Select a language") })
	t.Logf("installer dialog %s after the resume", time.Since(resumed).Round(time.Millisecond))
	if strings.Contains(console(), "Linux version") || strings.Contains(console(), "ISOLINUX") {
		t.Fatalf("the installer booted again after the resume:\n%s", console())
	}

	// The screen, through the API.
	shot := filepath.Join(t.TempDir(), "screen.png")
	a.mustVigil("vm", "screenshot", "inst", shot)
	if b, _ := os.ReadFile(shot); !bytes.HasPrefix(b, []byte("\x89PNG\r\n\x1a\n")) || len(b) < 1000 {
		t.Fatalf("screenshot is not a PNG (%d bytes)", len(b))
	}
	listen := freeAddr(t)
	vnc := exec.Command(filepath.Join(binDir, "vigil"), "vm", "console", "inst", "--vnc", "--listen", listen)
	vnc.Env = append(os.Environ(), "VIGIL_CONFIG="+a.configPath())
	var vncLog bytes.Buffer
	vnc.Stderr = &vncLog
	if err := vnc.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { vnc.Process.Kill(); vnc.Wait() }()
	var banner string
	waitFor(t, "a VNC banner through the tunnel", 20*time.Second, func() bool {
		conn, err := net.DialTimeout("tcp", listen, time.Second)
		if err != nil {
			return false
		}
		defer conn.Close()
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		banner, _ = bufio.NewReader(conn).ReadString('\n')
		return banner != ""
	})
	if !strings.HasPrefix(banner, "RFB 003.") {
		t.Fatalf("VNC banner %q; cli said: %s", banner, vncLog.String())
	}

	// Idle at a prompt, with no agent: never a hang.
	time.Sleep(15 * time.Second)
	if incs := incidents(t, a, "inst"); len(incs) != 0 {
		t.Fatalf("an installer idle at its prompt was judged: %+v", incs)
	}
	if v := showVM(t, a, "inst"); v.State != api.StateRunning {
		t.Fatalf("installer vm %s", v.State)
	}

	// Eject: the installed system would boot from the disk now.
	a.mustVigil("vm", "set", "inst", "--eject")
	if _, errOut, code := a.vigil("vm", "set", "inst", "--user-data", shot); code == 0 || !strings.Contains(errOut, "cloud-init") {
		t.Fatalf("user-data for an installer vm: exit %d %s", code, errOut)
	}
	a.mustVigil("vm", "delete", "inst", "--force")

	// UEFI: OVMF boots with the VM's own variables, which a snapshot keeps.
	a.mustVigil("vm", "create", "efi", "--iso", "installer", "--firmware", "uefi", "--disk", "1G", "--start")
	waitFor(t, "OVMF's boot manager on the serial console", 3*time.Minute, func() bool {
		return strings.Contains(a.mustVigil("vm", "console", "efi"), "BdsDxe")
	})
	vars := filepath.Join(a.dataDir, "host", "vms", "efi", "efivars.fd")
	if st, err := os.Stat(vars); err != nil || st.Size() == 0 {
		t.Fatalf("the vm's firmware variables: %v", err)
	}
	a.mustVigil("vm", "stop", "efi", "--force")
	a.mustVigil("snapshot", "create", "efi", "s1")
	if _, err := os.Stat(filepath.Join(a.dataDir, "host", "vms", "efi", "snapshots", "s1.efivars.fd")); err != nil {
		t.Fatalf("the snapshot did not keep the firmware variables: %v", err)
	}
	a.mustVigil("vm", "delete", "efi", "--force")
	a.mustVigil("image", "delete", "installer")
}
