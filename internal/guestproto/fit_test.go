package guestproto

import (
	"bytes"
	"strings"
	"testing"
	"unicode/utf8"
)

// checkFits encodes the result of FitExecResult and checks the line is
// within the limit, decodes, and carries a prefix of the output.
func checkFits(t *testing.T, id string, in ExecResult) ExecResult {
	t.Helper()
	got := FitExecResult(id, in)
	var buf bytes.Buffer
	if err := NewEncoder(&buf).Encode(Message{Type: TypeExecResult, ID: id, ExecResult: &got}); err != nil {
		t.Fatalf("encode the fitted result: %v", err)
	}
	m, err := NewDecoder(&buf).Decode()
	if err != nil {
		t.Fatalf("decode the fitted result: %v", err)
	}
	if !strings.HasPrefix(in.Output, got.Output) {
		t.Fatal("the fitted output is not a prefix of the output")
	}
	if got.Truncated != (in.Truncated || len(got.Output) < len(in.Output)) {
		t.Fatalf("truncated = %v after cutting %d of %d bytes", got.Truncated, len(in.Output)-len(got.Output), len(in.Output))
	}
	if m.ExecResult == nil || m.ExecResult.ExitCode != in.ExitCode || m.ExecResult.Error != in.Error {
		t.Fatalf("decoded %+v", m.ExecResult)
	}
	return got
}

func TestFitExecResult(t *testing.T) {
	tests := []struct {
		name    string
		output  string
		minKept int // at least this many bytes of output survive
		cut     bool
	}{
		{"empty", "", 0, false},
		{"plain, at the limit", strings.Repeat("x", MaxExecOutput), MaxExecOutput, false},
		{"plain, over the limit", strings.Repeat("x", 3*MaxExecOutput), MaxExecOutput - 3, true},
		{"quotes double", strings.Repeat(`"`, MaxExecOutput), MaxExecOutput, false},
		{"control bytes grow six times", strings.Repeat("\x01", MaxExecOutput), 10 << 10, true},
		{"html characters grow six times", strings.Repeat("<&>", MaxExecOutput/3), 10 << 10, true},
		{"invalid utf-8", strings.Repeat("\xff", MaxExecOutput), 10 << 10, true},
		{"line separators grow twice", strings.Repeat("\u2028", MaxExecOutput/3), MaxExecOutput - 1, false},
		{"multibyte, cut on a character", strings.Repeat("é", MaxExecOutput), MaxExecOutput - 3, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			in := ExecResult{ExitCode: 3, Output: tt.output, Error: "timed out after 30s"}
			got := checkFits(t, "h12", in)
			if len(got.Output) < tt.minKept {
				t.Fatalf("kept %d bytes, want at least %d", len(got.Output), tt.minKept)
			}
			if got.Truncated != tt.cut {
				t.Fatalf("truncated = %v, want %v", got.Truncated, tt.cut)
			}
			if utf8.ValidString(tt.output) && !utf8.ValidString(got.Output) {
				t.Fatal("a character was split")
			}
		})
	}
	// An id so long that nothing fits: the output goes, nothing breaks.
	got := FitExecResult(strings.Repeat("i", MaxLineBytes), ExecResult{Output: "x"})
	if got.Output != "" || !got.Truncated {
		t.Fatalf("with an over-long id: %+v", got)
	}
}

func FuzzFitExecResult(f *testing.F) {
	f.Add("h1", "hello\n", false)
	f.Add("h2", strings.Repeat("\x01<\xff\"\u2028", 4000), false)
	f.Add("h3", strings.Repeat("\xe2\x80", 9000), true)
	f.Fuzz(func(t *testing.T, id, output string, truncated bool) {
		if len(id) > 1<<10 {
			return // ids are the host's, short
		}
		// Grow small inputs past the limits too.
		for len(output) > 0 && len(output) < 2*MaxExecOutput {
			output += output
		}
		checkFits(t, id, ExecResult{Output: output, Truncated: truncated, ExitCode: 1})
	})
}
