package qga

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vigil-project/vigil/internal/qga/qgatest"
)

var blockedRPCs = qgatest.Blocked

// startRealAgent runs qemu-ga in unix-listen mode, where it plays the part
// QEMU's chardev socket plays for a real guest: it listens, we connect.
func startRealAgent(t *testing.T) (sock string, agent *os.Process) {
	t.Helper()
	sock = filepath.Join(t.TempDir(), "qga.sock")
	return sock, qgatest.Start(t, sock)
}

func TestRealAgent(t *testing.T) {
	sock, agent := startRealAgent(t)

	// Leave a half-read request in the agent's parser, as a client that
	// died mid-write would. Without the 0xFF flush the agent would swallow
	// everything we send from now on.
	nc, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	nc.Write([]byte(`{"execute":"guest-ping"`))
	nc.Close()

	c, err := Dial(long(t), sock)
	if err != nil {
		t.Fatalf("dial after a half request: %v", err)
	}
	t.Cleanup(func() { c.Close() })

	info, err := c.Info(long(t))
	if err != nil {
		t.Fatal(err)
	}
	if info.Version == "" || !info.Supports("guest-exec") {
		t.Fatalf("info %+v", info)
	}
	for _, cmd := range blockedRPCs {
		if info.Supports(cmd) {
			t.Fatalf("%s is enabled in the agent under test; refusing to go on", cmd)
		}
	}
	t.Logf("qemu-ga %s", info.Version)

	t.Run("ping", func(t *testing.T) {
		if err := c.Ping(long(t)); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("os info", func(t *testing.T) {
		osi, err := c.OSInfo(long(t))
		if err != nil {
			t.Fatal(err)
		}
		release, _ := os.ReadFile("/proc/sys/kernel/osrelease")
		if osi.KernelRelease != strings.TrimSpace(string(release)) || osi.Machine == "" {
			t.Fatalf("os info %+v", osi)
		}
	})
	t.Run("host name", func(t *testing.T) {
		got, err := c.HostName(long(t))
		if err != nil {
			t.Fatal(err)
		}
		if want, _ := os.Hostname(); got != want {
			t.Fatalf("host name %q, want %q", got, want)
		}
	})
	t.Run("interfaces", func(t *testing.T) {
		ifs, err := c.Interfaces(long(t))
		if err != nil {
			t.Fatal(err)
		}
		for _, ifc := range ifs {
			for _, addr := range ifc.IPAddresses {
				if ifc.Name == "lo" && addr == (IPAddress{Type: "ipv4", Address: "127.0.0.1", Prefix: 8}) {
					return
				}
			}
		}
		t.Fatalf("no lo with 127.0.0.1/8 in %+v", ifs)
	})
	t.Run("boot id", func(t *testing.T) {
		const path = "/proc/sys/kernel/random/boot_id"
		got, err := c.ReadFile(long(t), path, 64)
		if err != nil {
			t.Fatal(err)
		}
		want, _ := os.ReadFile(path)
		if !bytes.Equal(got, want) {
			t.Fatalf("boot id %q, want %q", got, want)
		}
	})
	t.Run("read file errors", func(t *testing.T) {
		var agentErr *Error
		if _, err := c.ReadFile(long(t), "/nonexistent/file", 64); !errors.As(err, &agentErr) {
			t.Fatalf("missing file: %v, want an agent error", err)
		}
		if _, err := c.ReadFile(long(t), "/proc/self/status", 10); err == nil {
			t.Fatal("file longer than max: no error")
		}
	})
	t.Run("freeze status", func(t *testing.T) {
		s, err := c.FSFreezeStatus(long(t))
		if err != nil || s != "thawed" {
			t.Fatalf("status %q, %v", s, err)
		}
	})
	t.Run("disabled commands", func(t *testing.T) {
		// Only safe because guest-info said they are disabled.
		_, err := c.FSFreeze(long(t))
		if agentErr := (*Error)(nil); !errors.As(err, &agentErr) {
			t.Fatalf("freeze: %v, want an agent error", err)
		}
		t.Logf("freeze: %v", err)
		err = c.Shutdown(long(t), "powerdown")
		if agentErr := (*Error)(nil); !errors.As(err, &agentErr) {
			t.Fatalf("shutdown: %v, want an agent error", err)
		}
		t.Logf("shutdown: %v", err)
		var agentErr *Error
		if err := c.Run(long(t), "guest-no-such-command", nil, nil); !errors.As(err, &agentErr) || agentErr.Class != "CommandNotFound" {
			t.Fatalf("unknown command: %v, want CommandNotFound", err)
		}
	})

	execTests := []struct {
		name      string
		path      string
		args, env []string
		input     []byte
		maxOutput int
		check     func(t *testing.T, r ExecResult)
	}{
		{
			name: "exit status and output", path: "/bin/sh", args: []string{"-c", "echo hi; echo err >&2; sleep 0.2; exit 3"},
			check: func(t *testing.T, r ExecResult) {
				if r.ExitCode != 3 || string(r.Stdout) != "hi\n" || string(r.Stderr) != "err\n" || r.Signal != 0 || r.Truncated {
					t.Fatalf("result %+v", r)
				}
			},
		},
		{
			name: "input and environment", path: "sh", args: []string{"-c", "cat; echo \" $FOO\""},
			env: []string{"FOO=bar", "PATH=/usr/bin:/bin"}, input: []byte("hello"),
			check: func(t *testing.T, r ExecResult) {
				if r.ExitCode != 0 || string(r.Stdout) != "hello bar\n" {
					t.Fatalf("result %+v", r)
				}
			},
		},
		{
			name: "killed", path: "/bin/sh", args: []string{"-c", "kill -9 $$"},
			check: func(t *testing.T, r ExecResult) {
				if r.ExitCode != -1 || r.Signal != 9 {
					t.Fatalf("result %+v", r)
				}
			},
		},
		{
			name: "output capped", path: "head", args: []string{"-c", "100000", "/dev/zero"}, maxOutput: 1000,
			check: func(t *testing.T, r ExecResult) {
				if len(r.Stdout) != 1000 || !r.Truncated {
					t.Fatalf("%d bytes, truncated %v", len(r.Stdout), r.Truncated)
				}
			},
		},
		{
			// 13 MB of output is a ~17.3 MB answer line: more than
			// ordinary answers may be, within the bound for exec status.
			// (Never let this one time out: qemu-ga 7.2 in unix-listen
			// mode spins for good when its client hangs up in the middle
			// of a large answer.)
			name: "large output", path: "head", args: []string{"-c", "13000000", "/dev/zero"},
			check: func(t *testing.T, r ExecResult) {
				if len(r.Stdout) != 13000000 || r.Truncated {
					t.Fatalf("%d bytes, truncated %v", len(r.Stdout), r.Truncated)
				}
			},
		},
	}
	for _, tt := range execTests {
		t.Run("exec "+tt.name, func(t *testing.T) {
			r, err := c.Exec(long(t), tt.path, tt.args, tt.env, tt.input, tt.maxOutput)
			if err != nil {
				t.Fatal(err)
			}
			tt.check(t, r)
		})
	}
	t.Run("exec missing program", func(t *testing.T) {
		var agentErr *Error
		if _, err := c.Exec(long(t), "/nonexistent", nil, nil, nil, 0); !errors.As(err, &agentErr) {
			t.Fatalf("err = %v, want an agent error", err)
		}
	})

	t.Run("concurrent calls", func(t *testing.T) {
		want, _ := os.Hostname()
		var wg sync.WaitGroup
		for range 10 {
			wg.Go(func() {
				if got, err := c.HostName(long(t)); err != nil || got != want {
					t.Errorf("host name %q, %v", got, err)
				}
			})
		}
		wg.Wait()
	})

	t.Run("hung agent then recovery", func(t *testing.T) {
		// A stopped agent is what a hung guest looks like from the host:
		// connections are still accepted (into the listen backlog), but
		// nothing answers.
		if err := agent.Signal(syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		defer agent.Signal(syscall.SIGCONT)
		if err := c.Ping(short(t)); !errors.Is(err, ErrNoAnswer) {
			t.Fatalf("ping to a stopped agent: %v, want ErrNoAnswer", err)
		}
		// The next call redials and must time out in the sync as well.
		if _, err := c.HostName(short(t)); !errors.Is(err, ErrNoAnswer) {
			t.Fatalf("host name from a stopped agent: %v, want ErrNoAnswer", err)
		}
		if err := agent.Signal(syscall.SIGCONT); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := c.Ping(ctx); err != nil {
			t.Fatalf("ping after the agent recovered: %v", err)
		}
		got, err := c.HostName(ctx)
		if want, _ := os.Hostname(); err != nil || got != want {
			t.Fatalf("host name %q, %v", got, err)
		}
	})
}
