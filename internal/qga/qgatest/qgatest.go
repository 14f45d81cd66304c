// Package qgatest runs the real qemu-guest-agent for tests, on this machine
// rather than in a guest: in unix-listen mode it plays the part QEMU's
// chardev socket plays for a guest (it listens, the client connects).
package qgatest

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vigil-project/vigil/internal/testenv"
)

// Blocked are the commands disabled in an agent started here: it runs on
// this machine, so it must not be able to shut it down, freeze its file
// systems or change its settings. Tests that call one check through
// guest-info that it really is disabled first.
var Blocked = []string{
	"guest-shutdown", "guest-suspend-disk", "guest-suspend-ram", "guest-suspend-hybrid",
	"guest-fsfreeze-freeze", "guest-fsfreeze-freeze-list", "guest-fsfreeze-thaw", "guest-fstrim",
	"guest-set-time", "guest-set-user-password", "guest-set-vcpus", "guest-set-memory-blocks",
	"guest-file-write", "guest-ssh-add-authorized-keys", "guest-ssh-remove-authorized-keys",
}

// Start runs qemu-ga listening on sock (the Blocked commands disabled)
// until the test ends, and returns its process. It skips the test in
// -short mode or when qemu-ga is not installed.
func Start(t testing.TB, sock string) *os.Process {
	t.Helper()
	if testing.Short() {
		t.Skip("skipping the real qemu-ga in -short mode")
	}
	bin := testenv.NeedProgram(t, "qemu-ga", "qemu-guest-agent")
	dir := t.TempDir()
	cmd := exec.Command(bin,
		"-m", "unix-listen", "-p", sock,
		"-t", dir, "-f", filepath.Join(dir, "qga.pid"), "-l", filepath.Join(dir, "qga.log"),
		"-b", strings.Join(Blocked, ","))
	// Keep the machine's /etc/qemu/qemu-ga.conf out of it.
	cmd.Env = append(os.Environ(), "QGA_CONF="+filepath.Join(dir, "none.conf"))
	if err := cmd.Start(); err != nil {
		t.Fatalf("start qemu-ga: %v", err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			log, _ := os.ReadFile(filepath.Join(dir, "qga.log"))
			t.Logf("qemu-ga log:\n%s", log)
		}
	})
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if _, err := os.Stat(sock); err == nil {
			return cmd.Process
		}
		if time.Now().After(deadline) {
			t.Fatal("qemu-ga did not create its socket")
		}
	}
}
