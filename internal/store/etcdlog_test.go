package store

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"strings"
	"sync/atomic"
	"testing"

	"go.uber.org/zap"
)

// TestEtcdLogger: etcd's warnings and errors reach slog with their fields,
// its info does not, a warning repeated within the sampling tick is logged
// once, and nothing is once quiet is set.
func TestEtcdLogger(t *testing.T) {
	var buf bytes.Buffer
	quiet := new(atomic.Bool)
	lg := etcdLogger(slog.New(slog.NewJSONHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug})), quiet)
	lg = lg.With(zap.String("local-member-id", "8e9e05c52164694d"))

	lg.Info("ready to serve client requests")
	lg.Warn("simple token is not cryptographically signed") // known noise
	lg.Warn("slow fdatasync", zap.Duration("took", 1500e6), zap.Duration("expected-duration", 1e9))
	lg.Warn("slow fdatasync", zap.Duration("took", 2500e6)) // same message, same tick: dropped
	lg.Warn("apply request took too long", zap.Int("count", 3))
	lg.Error("failed to send out heartbeat on time")
	quiet.Store(true)
	lg.Error("stopping serving peer traffic")

	var got []map[string]any
	for _, line := range strings.Split(strings.TrimSpace(buf.String()), "\n") {
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Fatalf("line %q: %v", line, err)
		}
		got = append(got, m)
	}
	want := []struct{ level, msg string }{
		{"WARN", "etcd: slow fdatasync"},
		{"WARN", "etcd: apply request took too long"},
		{"ERROR", "etcd: failed to send out heartbeat on time"},
	}
	if len(got) != len(want) {
		t.Fatalf("got %d lines, want %d:\n%s", len(got), len(want), buf.String())
	}
	for i, w := range want {
		if got[i]["level"] != w.level || got[i]["msg"] != w.msg {
			t.Errorf("line %d: %v %v, want %s %s", i, got[i]["level"], got[i]["msg"], w.level, w.msg)
		}
		if got[i]["local-member-id"] != "8e9e05c52164694d" {
			t.Errorf("line %d lost the logger's field: %v", i, got[i])
		}
	}
	if got[0]["took"] != float64(1500e6) { // slog's JSON writes a duration in ns
		t.Errorf("the first warning's took = %v, want 1.5s", got[0]["took"])
	}
	if got[1]["count"] != float64(3) {
		t.Errorf("count = %v", got[1]["count"])
	}
}
