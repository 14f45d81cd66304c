package main

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/vigil-project/vigil/internal/guestproto"
)

func TestRunExec(t *testing.T) {
	tests := []struct {
		name     string
		e        guestproto.Exec
		exit     int
		output   string
		errSub   string
		truncate bool
	}{
		{"ok", guestproto.Exec{Command: "echo hi"}, 0, "hi\n", "", false},
		{"exit code", guestproto.Exec{Command: "echo oops >&2; exit 3"}, 3, "oops\n", "", false},
		{"timeout", guestproto.Exec{Command: "sleep 5", TimeoutSeconds: 1}, -1, "", "timed out", false},
		{"background", guestproto.Exec{Command: "sleep 5", Background: true}, 0, "", "", false},
		{"truncated", guestproto.Exec{Command: "head -c 40000 /dev/zero | tr '\\0' x"}, 0, "", "", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t0 := time.Now()
			res := runExec(context.Background(), tt.e)
			if res.ExitCode != tt.exit || (tt.output != "" && res.Output != tt.output) || !strings.Contains(res.Error, tt.errSub) || res.Truncated != tt.truncate {
				t.Fatalf("runExec = %+v", res)
			}
			if tt.e.Background && time.Since(t0) > time.Second {
				t.Fatal("background exec waited for the command")
			}
			if tt.truncate && len(res.Output) != guestproto.MaxExecOutput {
				t.Fatalf("output %d bytes, want %d", len(res.Output), guestproto.MaxExecOutput)
			}
		})
	}
}
