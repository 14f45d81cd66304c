package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"os/exec"
	"path/filepath"
	"reflect"
	"testing"
	"time"
)

func TestCommands(t *testing.T) {
	tests := []struct {
		name string
		cmd  string // expected "execute"
		ret  string
		call func(ctx context.Context, m *Monitor) (any, error)
		want any
	}{
		{
			name: "QueryStatus",
			cmd:  "query-status",
			ret:  `{"status": "running", "singlestep": false, "running": true}`,
			call: func(ctx context.Context, m *Monitor) (any, error) { return m.QueryStatus(ctx) },
			want: Status{Status: "running", Running: true},
		},
		{
			name: "QueryVersion",
			cmd:  "query-version",
			ret:  `{"qemu": {"micro": 0, "minor": 2, "major": 8}, "package": "v8.2.0"}`,
			call: func(ctx context.Context, m *Monitor) (any, error) { return m.QueryVersion(ctx) },
			want: Version{Major: 8, Minor: 2, Micro: 0, Package: "v8.2.0"},
		},
		{
			name: "Stop",
			cmd:  "stop",
			ret:  `{}`,
			call: func(ctx context.Context, m *Monitor) (any, error) { return nil, m.Stop(ctx) },
		},
		{
			name: "Cont",
			cmd:  "cont",
			ret:  `{}`,
			call: func(ctx context.Context, m *Monitor) (any, error) { return nil, m.Cont(ctx) },
		},
		{
			name: "SystemPowerdown",
			cmd:  "system_powerdown",
			ret:  `{}`,
			call: func(ctx context.Context, m *Monitor) (any, error) { return nil, m.SystemPowerdown(ctx) },
		},
		{
			name: "Quit",
			cmd:  "quit",
			ret:  `{}`,
			call: func(ctx context.Context, m *Monitor) (any, error) { return nil, m.Quit(ctx) },
		},
		{
			name: "QueryBlockStats",
			cmd:  "query-blockstats",
			ret: `[
				{"device": "drive0", "node-name": "#block123", "stats": {"rd_bytes": 4096, "wr_bytes": 512, "rd_operations": 8, "wr_operations": 1, "flush_operations": 0}},
				{"device": "", "node-name": "disk1", "stats": {"rd_bytes": 0, "wr_bytes": 0, "rd_operations": 0, "wr_operations": 0}}
			]`,
			call: func(ctx context.Context, m *Monitor) (any, error) { return m.QueryBlockStats(ctx) },
			want: []BlockStats{
				{Device: "drive0", NodeName: "#block123", Stats: BlockDeviceStats{RdBytes: 4096, WrBytes: 512, RdOperations: 8, WrOperations: 1}},
				{NodeName: "disk1"},
			},
		},
		{
			name: "QueryCPUsFast",
			cmd:  "query-cpus-fast",
			ret: `[
				{"cpu-index": 0, "qom-path": "/machine/unattached/device[0]", "thread-id": 1234, "target": "x86_64", "props": {"core-id": 0}},
				{"cpu-index": 1, "qom-path": "/machine/unattached/device[1]", "thread-id": 1235, "target": "x86_64"}
			]`,
			call: func(ctx context.Context, m *Monitor) (any, error) { return m.QueryCPUsFast(ctx) },
			want: []CPU{
				{CPUIndex: 0, ThreadID: 1234, QOMPath: "/machine/unattached/device[0]"},
				{CPUIndex: 1, ThreadID: 1235, QOMPath: "/machine/unattached/device[1]"},
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, s := newPair(t)
			type result struct {
				v   any
				err error
			}
			res := make(chan result, 1)
			go func() {
				v, err := tt.call(context.Background(), m)
				res <- result{v, err}
			}()
			r := s.expect(tt.cmd)
			if len(r.Arguments) != 0 {
				t.Fatalf("%s sent arguments %s, want none", tt.cmd, r.Arguments)
			}
			s.reply(r.ID, json.RawMessage(tt.ret))
			var got result
			select {
			case got = <-res:
			case <-time.After(5 * time.Second):
				t.Fatalf("%s did not return", tt.name)
			}
			if got.err != nil {
				t.Fatalf("%s: %v", tt.name, got.err)
			}
			if tt.want != nil && !reflect.DeepEqual(got.v, tt.want) {
				t.Fatalf("%s = %+v, want %+v", tt.name, got.v, tt.want)
			}
		})
	}
}

func TestCommandErrorPropagates(t *testing.T) {
	m, s := newPair(t)
	errc := async(func() error {
		_, err := m.QueryStatus(context.Background())
		return err
	})
	s.replyError(s.expect("query-status").ID, "GenericError", "nope")
	var qe *Error
	if err := wait(t, errc); !errors.As(err, &qe) || qe.Desc != "nope" {
		t.Fatalf("QueryStatus error = %v, want *Error nope", err)
	}
}

func TestQuitConnectionDropIsSuccess(t *testing.T) {
	m, s := newPair(t)
	errc := async(func() error { return m.Quit(context.Background()) })
	s.expect("quit")
	s.conn.Close() // QEMU exiting before the reply reaches us
	if err := wait(t, errc); err != nil {
		t.Fatalf("Quit = %v, want nil when the connection drops", err)
	}
	waitClosed(t, m.Done(), "Done")
}

// TestRealQEMU checks the protocol assumptions against an actual QEMU,
// which the fake server cannot prove.
func TestRealQEMU(t *testing.T) {
	if testing.Short() {
		t.Skip("skipping real QEMU test in -short mode")
	}
	bin, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Skip("qemu-system-x86_64 not on PATH")
	}

	sock := filepath.Join(t.TempDir(), "qmp.sock")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin,
		"-machine", "none", "-nodefaults", "-display", "none",
		"-qmp", "unix:"+sock+",server=on,wait=off")
	if err := cmd.Start(); err != nil {
		t.Fatalf("start qemu: %v", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		cmd.Process.Kill()
		<-exited
	}()

	// The socket appears only once QEMU has initialized; retry until then.
	var m *Monitor
	for {
		m, err = Dial(ctx, sock)
		if err == nil {
			break
		}
		select {
		case werr := <-exited:
			exited <- werr
			t.Fatalf("qemu exited before QMP was ready: %v (last dial error: %v)", werr, err)
		case <-ctx.Done():
			t.Fatalf("QMP socket never became ready: %v", err)
		case <-time.After(50 * time.Millisecond):
		}
	}
	defer m.Close()

	if v := m.Version(); v.Major < 7 {
		t.Fatalf("greeting version = %v, want >= 7", v)
	}
	st, err := m.QueryStatus(ctx)
	if err != nil {
		t.Fatalf("QueryStatus: %v", err)
	}
	if st.Status == "" {
		t.Fatalf("QueryStatus returned empty status: %+v", st)
	}
	v, err := m.QueryVersion(ctx)
	if err != nil {
		t.Fatalf("QueryVersion: %v", err)
	}
	if v.Major < 7 || v != m.Version() {
		t.Fatalf("QueryVersion = %v, greeting %v", v, m.Version())
	}
	if _, err := m.QueryCPUsFast(ctx); err != nil {
		t.Fatalf("QueryCPUsFast: %v", err)
	}
	if _, err := m.QueryBlockStats(ctx); err != nil {
		t.Fatalf("QueryBlockStats: %v", err)
	}
	out, err := m.HMP(ctx, "info version")
	if err != nil || out == "" {
		t.Fatalf("HMP info version = %q, %v", out, err)
	}
	var qe *Error
	if err := m.Run(ctx, "no-such-command", nil, nil); !errors.As(err, &qe) || qe.Class != "CommandNotFound" {
		t.Fatalf("unknown command error = %v, want *Error CommandNotFound", err)
	}

	events, cancelSub := m.Subscribe()
	defer cancelSub()
	if err := m.Quit(ctx); err != nil {
		t.Fatalf("Quit: %v", err)
	}
	waitClosed(t, m.Done(), "Done after quit")
	if err := m.Err(); !errors.Is(err, ErrClosed) {
		t.Fatalf("Err() after quit = %v, want ErrClosed", err)
	}
	sawShutdown := false
	for ev := range events {
		if ev.Name == "SHUTDOWN" {
			sawShutdown = true
		}
	}
	if !sawShutdown {
		t.Fatalf("no SHUTDOWN event before the connection closed")
	}
	select {
	case err := <-exited:
		exited <- err
		if err != nil {
			t.Fatalf("qemu exit: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("qemu did not exit after quit")
	}
}
