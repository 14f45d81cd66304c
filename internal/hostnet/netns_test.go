package hostnet

import (
	"fmt"
	"os"
	"os/exec"
	"syscall"
	"testing"
)

// The tests that touch the kernel run in a network namespace of their own:
// TestMain runs the test binary again in a new one (as root), so no test
// ever sees or changes the machine's own network.

const inNetNSEnv = "VIGIL_HOSTNET_TEST_NETNS"

func TestMain(m *testing.M) {
	if os.Getenv(inNetNSEnv) != "" || os.Geteuid() != 0 {
		os.Exit(m.Run())
	}
	cmd := exec.Command(os.Args[0], os.Args[1:]...)
	cmd.Env = append(os.Environ(), inNetNSEnv+"=1")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET}
	if err := cmd.Run(); err != nil {
		if ee, ok := err.(*exec.ExitError); ok {
			os.Exit(ee.ExitCode())
		}
		fmt.Fprintln(os.Stderr, "hostnet tests: run in a new network namespace:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

// needNetNS skips a test that changes the kernel's network state unless it
// runs in the private namespace TestMain made.
func needNetNS(t *testing.T) {
	t.Helper()
	if os.Getenv(inNetNSEnv) == "" {
		t.Skip("needs root (to run in a network namespace of its own)")
	}
	if err := setSysctl("net/ipv4/ip_forward", "0"); err != nil {
		t.Skipf("cannot change this namespace's sysctls: %v", err)
	}
}
