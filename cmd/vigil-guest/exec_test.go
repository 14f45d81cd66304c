package main

import (
	"context"
	"fmt"
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

// TestExecResultFitsALine: whatever bytes a command prints, its result
// goes back as one well-formed line; output that JSON-escapes badly (up to
// six bytes per byte) is cut to fit and marked truncated.
func TestExecResultFitsALine(t *testing.T) {
	const n = guestproto.MaxExecOutput
	tests := []struct {
		name     string
		char     string // tr's notation of the byte printed n times
		want     rune   // what each character of the output decodes to
		truncate bool
	}{
		{"control bytes", `\1`, 0x01, true},
		{"html characters", `<`, '<', true},
		{"invalid utf-8", `\377`, 0xFFFD, true},
		{"quotes", `"`, '"', false},
		{"plain", `x`, 'x', false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h, _ := startAgent(t, testAgent(fakeProc(), time.Hour), nil)
			cmd := fmt.Sprintf(`head -c %d /dev/zero | tr '\0' '%s'`, n, tt.char)
			if err := h.enc.Encode(guestproto.Message{Type: guestproto.TypeExec, ID: "x-1", Exec: &guestproto.Exec{Command: cmd}}); err != nil {
				t.Fatal(err)
			}
			type decoded struct {
				m   guestproto.Message
				err error
			}
			got := make(chan decoded, 1)
			go func() {
				for {
					m, err := h.dec.Decode() // fails on a line over MaxLineBytes
					if err != nil || m.Type == guestproto.TypeExecResult {
						got <- decoded{m, err}
						return
					}
				}
			}()
			var m guestproto.Message
			select {
			case d := <-got:
				if d.err != nil {
					t.Fatalf("decode: %v", d.err)
				}
				m = d.m
			case <-time.After(5 * time.Second):
				t.Fatal("no exec result within 5s")
			}
			res := m.ExecResult
			if m.ID != "x-1" || res.ExitCode != 0 || res.Error != "" || res.Truncated != tt.truncate {
				t.Fatalf("result id %q exit %d error %q truncated %v, want truncated %v", m.ID, res.ExitCode, res.Error, res.Truncated, tt.truncate)
			}
			runes := []rune(res.Output)
			if !tt.truncate && len(runes) != n || tt.truncate && (len(runes) >= n || len(runes) < n/8) {
				t.Fatalf("output of %d characters (truncated %v)", len(runes), res.Truncated)
			}
			for i, r := range runes {
				if r != tt.want {
					t.Fatalf("output character %d is %q, want %q", i, r, tt.want)
				}
			}
		})
	}
}
