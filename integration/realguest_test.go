package integration

import (
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vigil-project/vigil/api"
)

// userData is cloud-config that installs a web server as a systemd unit
// (so it comes back after every reboot) serving the version string at /
// and the guest's boot id at /cgi-bin/boot.
func userData(t *testing.T, version string) string {
	t.Helper()
	doc := `#cloud-config
write_files:
  - path: /srv/www/index.html
    content: "` + version + `\n"
  - path: /srv/www/cgi-bin/boot
    permissions: "0755"
    content: |
      #!/bin/sh
      printf 'Content-Type: text/plain\r\n\r\n'
      cat /proc/sys/kernel/random/boot_id
  - path: /etc/systemd/system/vigil-web.service
    content: |
      [Unit]
      Description=web server of Vigil's tests
      After=network.target
      [Service]
      ExecStart=/bin/busybox httpd -f -p 80 -h /srv/www
      Restart=always
      [Install]
      WantedBy=multi-user.target
runcmd:
  - [systemctl, daemon-reload]
  - [systemctl, enable, --now, vigil-web.service]
`
	p := filepath.Join(t.TempDir(), version+".yaml")
	if err := os.WriteFile(p, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// fetch GETs a guest's page once; "" when it does not answer 200.
func fetch(url string) string {
	c := &http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return ""
	}
	defer resp.Body.Close()
	var b strings.Builder
	buf := make([]byte, 4096)
	n, _ := resp.Body.Read(buf)
	b.Write(buf[:n])
	if resp.StatusCode != http.StatusOK {
		return ""
	}
	return strings.TrimSpace(b.String())
}

// serving waits until the VM's web server answers page at / and returns
// the boot id it reports.
func serving(t *testing.T, m *devAgent, vm, page string, timeout time.Duration) (api.VM, string) {
	t.Helper()
	var v api.VM
	var boot string
	waitFor(t, vm+" serving "+page, timeout, func() bool {
		v = showVM(t, m, vm)
		if v.State != api.StateRunning || v.Guest == nil {
			return false
		}
		if fetch("http://"+v.Endpoint+"/") != page {
			return false
		}
		boot = fetch("http://" + v.Endpoint + "/cgi-bin/boot")
		return boot != ""
	})
	return v, boot
}

// TestRealGuest runs a Debian image configured by cloud-init with the
// distribution's qemu-guest-agent through every mechanism of Vigil, on one
// VM (a boot takes over a minute under TCG): user-data that starts a
// service, the guest's details through qemu-ga, exec, a quiesced snapshot,
// suspend and resume, a memory snapshot and its revert, live migration, a
// panic recovered, a host failover, new user-data, and a clean stop.
func TestRealGuest(t *testing.T) {
	needDebian(t)
	c := startPoolCluster(t, "h1", "h2")
	m := c.m

	start := time.Now()
	var img api.Image
	json.Unmarshal([]byte(mustVigilFor(t, m, 5*time.Minute, "image", "import", "debian", debianImage, "-o", "json")), &img)
	if img.Format != "qcow2" || img.VirtualSize != 2<<30 || !strings.HasPrefix(img.Digest, "sha256:") {
		t.Fatalf("imported image: %+v", img)
	}
	t.Logf("image imported in %s (%d MiB)", time.Since(start).Round(time.Millisecond), img.FileSize>>20)

	// Create from the image with user-data; --wait returns when qemu-ga answers.
	start = time.Now()
	var v api.VM
	out := mustVigilFor(t, m, 8*time.Minute, "vm", "create", "deb", "--image", "debian", "--disk", "4G", "--host", "h1",
		"--user-data", userData(t, "v1"), "--start", "--wait", "-o", "json")
	if err := json.Unmarshal([]byte(out), &v); err != nil || v.Guest == nil || v.Guest.Agent != "qemu-ga" {
		t.Fatalf("create --wait: %v\n%s", err, out)
	}
	t.Logf("create --start --wait: qemu-guest-agent answered after %s", time.Since(start).Round(time.Millisecond))
	v, boot := serving(t, m, "deb", "v1", 6*time.Minute)
	t.Logf("user-data's service answering after %s", time.Since(start).Round(time.Millisecond))
	g := v.Guest
	if boot != g.BootID || !strings.Contains(g.OS, "Debian") || g.Hostname != "deb" || !slices.Contains(g.Addresses, "10.0.2.15/24") {
		t.Fatalf("guest through qemu-ga: %+v (the guest says boot %s)", g, boot)
	}
	if v.Image != "debian" || v.DiskBytes != 4<<30 {
		t.Fatalf("vm: image %q disk %d", v.Image, v.DiskBytes)
	}
	var imgs []api.Image
	json.Unmarshal([]byte(m.mustVigil("image", "list", "-o", "json")), &imgs)
	if len(imgs) != 1 || strings.Join(imgs[0].VMs, ",") != "deb" {
		t.Fatalf("image list: %+v", imgs)
	}
	if _, errOut, code := m.vigil("image", "delete", "debian"); code == 0 || !strings.Contains(errOut, "deb") {
		t.Fatalf("deleting an image in use: exit %d, %s", code, errOut)
	}

	// exec through guest-exec; cloud-init grew the root file system to the disk.
	if got := strings.TrimSpace(execOut(t, m, "deb", "cat /etc/hostname")); got != "deb" {
		t.Fatalf("hostname through exec: %q", got)
	}
	size, _ := strconv.ParseInt(strings.TrimSpace(execOut(t, m, "deb", "df --output=size -B1M / | tail -1")), 10, 64)
	if size < 3500 {
		t.Fatalf("root file system is %d MiB on a 4 GiB disk: not grown", size)
	}

	// A quiesced snapshot: the file systems frozen, the CPUs never paused.
	var s api.Snapshot
	json.Unmarshal([]byte(m.mustVigil("snapshot", "create", "deb", "quiet", "--no-memory", "-o", "json")), &s)
	if s.Consistency != "application" || s.Operation == nil || s.Operation.FrozenMS <= 0 || s.Operation.PausedMS != 0 {
		t.Fatalf("quiesced snapshot: %+v %+v", s, s.Operation)
	}
	t.Logf("quiesced snapshot: %.0f ms, file systems frozen %.1f ms (%s)", s.Operation.DurationMS, s.Operation.FrozenMS, s.Operation.Note)
	if got := execOut(t, m, "deb", "echo written-after-thaw > /root/thaw && cat /root/thaw"); !strings.Contains(got, "written-after-thaw") {
		t.Fatalf("the guest cannot write after the snapshot: %q", got)
	}

	// Suspend to disk and resume: the same boot goes on.
	m.mustVigil("vm", "pause", "deb", "--to-disk")
	if v := showVM(t, m, "deb"); v.State != api.StateSuspended {
		t.Fatalf("after pause --to-disk: %s", v.State)
	}
	m.mustVigil("vm", "resume", "deb")
	if _, b := serving(t, m, "deb", "v1", time.Minute); b != boot {
		t.Fatalf("suspend/resume rebooted the guest: boot %s, was %s", b, boot)
	}

	// A memory snapshot and its revert: back to that instant, same boot.
	m.mustVigil("snapshot", "create", "deb", "full")
	execOut(t, m, "deb", "echo after > /root/marker; sync")
	m.mustVigil("snapshot", "revert", "deb", "full")
	if _, b := serving(t, m, "deb", "v1", time.Minute); b != boot {
		t.Fatalf("revert changed the boot: %s, was %s", b, boot)
	}
	if got := execOut(t, m, "deb", "cat /root/marker 2>&1 || true"); strings.Contains(got, "after") {
		t.Fatalf("a file written after the snapshot survived its revert: %q", got)
	}

	// Live migration to h2: same boot.
	mustVigilFor(t, m, 5*time.Minute, "vm", "migrate", "deb", "--to", "h2")
	if v, b := serving(t, m, "deb", "v1", time.Minute); v.Host != "h2" || b != boot {
		t.Fatalf("after migration: host %s boot %s (was %s)", v.Host, b, boot)
	}

	// New user-data applies at the next boot (under a new instance id),
	// here the one after a panic, injected through qemu-ga's exec and
	// recovered by Vigil.
	m.mustVigil("vm", "set", "deb", "--user-data", userData(t, "v2"), "--min-uptime", "5s")
	if _, b := serving(t, m, "deb", "v1", time.Minute); b != boot {
		t.Fatal("new user-data rebooted the guest")
	}
	m.mustVigil("vm", "fault", "deb", "panic")
	waitFor(t, "the panic recovered", 6*time.Minute, func() bool {
		incs := incidents(t, m, "deb")
		return len(incs) == 1 && incs[0].Kind == "panic" && incs[0].RecoveredAt != nil
	})
	_, b := serving(t, m, "deb", "v2", 6*time.Minute)
	if b == boot {
		t.Fatal("the guest did not reboot after its panic")
	}
	boot = b

	// Host failover: h2 dies with its QEMU; the VM boots on h1.
	c.hosts["h2"].kill()
	killQEMUs(c.dirs["h2"])
	killed := time.Now()
	v, b = serving(t, m, "deb", "v2", 8*time.Minute)
	if v.Host != "h1" || b == boot {
		t.Fatalf("after h2 died: host %s boot %s (was %s)", v.Host, b, boot)
	}
	t.Logf("host failover: serving again on h1 %s after h2 died", time.Since(killed).Round(time.Second))

	// A clean stop through ACPI (or qemu-ga's guest-shutdown).
	start = time.Now()
	mustVigilFor(t, m, 5*time.Minute, "vm", "stop", "deb", "--timeout", "2m")
	if v := showVM(t, m, "deb"); v.State != api.StateStopped {
		t.Fatalf("after stop: %s", v.State)
	}
	t.Logf("clean stop in %s", time.Since(start).Round(time.Millisecond))
	m.mustVigil("vm", "delete", "deb", "--force")
	m.mustVigil("image", "delete", "debian")
}

func mustVigilFor(t *testing.T, a *devAgent, limit time.Duration, args ...string) string {
	t.Helper()
	out, errOut, code := a.vigilFor(limit, args...)
	if code != 0 {
		t.Fatalf("vigil %s: exit %d: %s", strings.Join(args, " "), code, errOut)
	}
	return out
}
