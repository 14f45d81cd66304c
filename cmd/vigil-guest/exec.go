package main

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"syscall"
	"time"

	"github.com/vigil-project/vigil/internal/guestproto"
)

// runExec runs e with /bin/sh -c. A background command is detached in its
// own session, so it outlives this agent (which init may respawn).
func runExec(ctx context.Context, e guestproto.Exec) guestproto.ExecResult {
	if e.Background {
		cmd := exec.Command("/bin/sh", "-c", e.Command)
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
		if devnull, err := os.OpenFile(os.DevNull, os.O_RDWR, 0); err == nil {
			cmd.Stdin, cmd.Stdout, cmd.Stderr = devnull, devnull, devnull
			defer devnull.Close()
		}
		if err := cmd.Start(); err != nil {
			return guestproto.ExecResult{ExitCode: -1, Error: err.Error()}
		}
		go cmd.Wait() // reap it
		return guestproto.ExecResult{}
	}
	timeout := 30 * time.Second
	if e.TimeoutSeconds > 0 {
		timeout = time.Duration(e.TimeoutSeconds) * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "/bin/sh", "-c", e.Command)
	// On timeout the whole process group goes, not only the shell: a child
	// holding the output pipe would otherwise keep us waiting.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = time.Second
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	// Cut to MaxExecOutput here; what the encoded line can carry is
	// FitExecResult's business, where the message is made.
	res := guestproto.ExecResult{Output: out.String()}
	if len(res.Output) > guestproto.MaxExecOutput {
		res.Output, res.Truncated = res.Output[:guestproto.MaxExecOutput], true
	}
	var ee *exec.ExitError
	switch {
	case ctx.Err() != nil:
		res.ExitCode, res.Error = -1, "timed out after "+timeout.String()
	case errors.As(err, &ee):
		res.ExitCode = ee.ExitCode()
	case err != nil:
		res.ExitCode, res.Error = -1, err.Error()
	}
	return res
}
