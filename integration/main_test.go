// Package integration boots real guests under QEMU through the real vigil
// binaries. These tests are slow (a guest boot takes a few seconds under TCG)
// and are skipped by `go test -short`; `make test` runs them.
package integration

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vigil-project/vigil/client"
)

var (
	binDir   string // holds vigil and vigil-guest
	imageDir string // a built guest image
	// debianImage is a Debian cloud-style qcow2 with cloud-init and
	// qemu-guest-agent (scripts/build-debian-image.sh; make test sets it).
	debianImage string
)

func TestMain(m *testing.M) {
	flag.Parse()
	if testing.Short() {
		os.Exit(m.Run()) // every test skips itself
	}
	tmp, err := os.MkdirTemp("", "vigil-it-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	// Dev agents write the user's default CLI configuration: keep theirs
	// in the test's own directory, not the user's.
	os.Setenv("XDG_CONFIG_HOME", filepath.Join(tmp, "config"))
	code, err := setup(tmp)
	if err != nil {
		fmt.Fprintln(os.Stderr, "integration setup:", err)
		code = 1
	} else {
		code = m.Run()
	}
	os.RemoveAll(tmp)
	os.Exit(code)
}

func setup(tmp string) (int, error) {
	binDir = os.Getenv("VIGIL_BIN")
	if binDir == "" {
		binDir = filepath.Join(tmp, "bin")
		for _, b := range []struct{ out, pkg, cgo string }{
			{"vigil", "./cmd/vigil", "1"},
			{"vigil-guest", "./cmd/vigil-guest", "0"},
		} {
			cmd := exec.Command("go", "build", "-o", filepath.Join(binDir, b.out), b.pkg)
			cmd.Dir = ".."
			cmd.Env = append(os.Environ(), "CGO_ENABLED="+b.cgo)
			if out, err := cmd.CombinedOutput(); err != nil {
				return 1, fmt.Errorf("build %s: %v\n%s", b.pkg, err, out)
			}
		}
	}
	debianImage = os.Getenv("VIGIL_DEBIAN_IMAGE")
	imageDir = os.Getenv("VIGIL_TEST_IMAGE")
	if imageDir == "" {
		imageDir = filepath.Join(tmp, "image")
	}
	// Reuses the image when it is up to date; builds it otherwise.
	out, err := exec.Command(filepath.Join(binDir, "vigil"), "image", "build", "--out", imageDir, "-q",
		"--guest-agent", filepath.Join(binDir, "vigil-guest")).CombinedOutput()
	if err != nil {
		return 1, fmt.Errorf("build guest image: %v\n%s", err, out)
	}
	return 0, nil
}

func needIntegration(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("boots real guests; skipped with -short")
	}
}

// needDebian skips a test that boots the Debian image when none was built
// (a plain 'go test'), but fails it in CI, where make test builds one.
func needDebian(t *testing.T) {
	t.Helper()
	needIntegration(t)
	if debianImage != "" {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("VIGIL_DEBIAN_IMAGE is not set in CI: make test builds the image and sets it")
	}
	t.Skip("no Debian image: run make test, or set VIGIL_DEBIAN_IMAGE to scripts/build-debian-image.sh's output")
}

// devAgent is a `vigil agent --dev` process under test.
type devAgent struct {
	t       *testing.T
	dataDir string
	addr    string
	cmd     *exec.Cmd
	log     *bytes.Buffer
	extra   []string
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// shortTempDir keeps unix socket paths under the kernel's 108-byte limit.
func shortTempDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "vt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

func newDevAgent(t *testing.T) *devAgent {
	a := &devAgent{t: t, dataDir: shortTempDir(t), addr: freeAddr(t)}
	a.start()
	t.Cleanup(func() {
		a.kill()
		killQEMUs(a.dataDir)
		if t.Failed() {
			t.Logf("agent log:\n%s", a.log)
		}
	})
	return a
}

func (a *devAgent) start() {
	a.t.Helper()
	a.log = &bytes.Buffer{}
	args := append([]string{"agent", "--dev", "--listen", a.addr, "--data-dir", a.dataDir,
		"--image-dir", imageDir, "--accel", "auto", "--log-level", "debug"}, a.extra...)
	a.cmd = exec.Command(filepath.Join(binDir, "vigil"), args...)
	a.cmd.Stdout, a.cmd.Stderr = a.log, a.log
	if err := a.cmd.Start(); err != nil {
		a.t.Fatalf("start agent: %v", err)
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		// A new client each time: the agent writes its configuration
		// (the CA, the admin token) once it runs.
		if _, err := a.client().Hosts(context.Background()); err == nil {
			return
		}
		if time.Now().After(deadline) {
			a.t.Fatalf("agent did not answer within 60s; log:\n%s", a.log)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// kill stops the agent with SIGKILL: nothing it could clean up is cleaned up.
func (a *devAgent) kill() {
	if a.cmd == nil || a.cmd.Process == nil {
		return
	}
	a.cmd.Process.Signal(syscall.SIGKILL)
	a.cmd.Wait()
	a.cmd = nil
}

// configPath is the admin CLI configuration the agent wrote.
func (a *devAgent) configPath() string { return filepath.Join(a.dataDir, "client.yaml") }

// client is an API client with the agent's admin configuration.
func (a *devAgent) client() *client.Client { return client.ForConfigFile(a.configPath()) }

// vigil runs the CLI against this agent and returns stdout, stderr and the exit code.
func (a *devAgent) vigil(args ...string) (string, string, int) {
	a.t.Helper()
	return a.vigilFor(2*time.Minute, args...)
}

// vigilFor is vigil with a time limit other than 2 minutes.
func (a *devAgent) vigilFor(limit time.Duration, args ...string) (string, string, int) {
	a.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(binDir, "vigil"), args...)
	cmd.Env = append(os.Environ(), "VIGIL_CONFIG="+a.configPath())
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		a.t.Fatalf("run vigil %v: %v", args, err)
	}
	return out.String(), errb.String(), code
}

// mustVigil runs the CLI and fails the test on a non-zero exit.
func (a *devAgent) mustVigil(args ...string) string {
	a.t.Helper()
	out, errs, code := a.vigil(args...)
	if code != 0 {
		a.t.Fatalf("vigil %s: exit %d: %s", strings.Join(args, " "), code, errs)
	}
	return out
}

// killQEMUs kills any QEMU left running under dataDir by a failed test.
func killQEMUs(dataDir string) {
	pids, _ := filepath.Glob(filepath.Join(dataDir, "host", "vms", "*", "qemu.pid"))
	for _, p := range pids {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		var pid int
		fmt.Sscan(string(b), &pid)
		if pid > 0 && processAlive(pid) {
			cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
			if bytes.Contains(cmdline, []byte(dataDir)) {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}
}

func processAlive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(b, ')')
	return i > 0 && i+2 < len(b) && b[i+2] != 'Z' && b[i+2] != 'X'
}

func waitFor(t *testing.T, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
