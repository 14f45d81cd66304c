package integration

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/rogpeppe/go-internal/testscript"
)

// TestCLIScripts runs the CLI behaviour scripts in testdata/script, each
// against its own `vigil agent --dev` (no guest is booted by them).
func TestCLIScripts(t *testing.T) {
	needIntegration(t)
	testscript.Run(t, testscript.Params{
		Dir: "testdata/script",
		Setup: func(env *testscript.Env) error {
			dataDir, err := os.MkdirTemp("", "vs")
			if err != nil {
				return err
			}
			addr := freeAddr(t)
			cmd := exec.Command(filepath.Join(binDir, "vigil"), "agent", "--dev", "--listen", addr,
				"--data-dir", dataDir, "--image-dir", imageDir)
			if err := cmd.Start(); err != nil {
				return err
			}
			env.Defer(func() {
				cmd.Process.Signal(syscall.SIGKILL)
				cmd.Wait()
				killQEMUs(dataDir)
				os.RemoveAll(dataDir)
			})
			a := &devAgent{t: t, dataDir: dataDir, addr: addr}
			deadline := time.Now().Add(60 * time.Second)
			for {
				if _, err := a.client().Hosts(context.Background()); err == nil {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("agent for the script did not start")
				}
				time.Sleep(50 * time.Millisecond)
			}
			env.Setenv("VIGIL_CONFIG", a.configPath())
			env.Setenv("PATH", binDir+string(os.PathListSeparator)+os.Getenv("PATH"))
			return nil
		},
	})
}
