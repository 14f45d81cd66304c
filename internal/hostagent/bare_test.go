package hostagent

import (
	"bytes"
	"log/slog"
	"sync"
	"testing"

	"github.com/vigil-project/vigil/internal/hostproto"
)

// newBareAgent is an Agent for unit tests that need no QEMU: New checks for
// the binary, this does not. Its image does not exist, so a launch fails.
func newBareAgent(t *testing.T) (*Agent, *recorder) {
	t.Helper()
	rec := &recorder{}
	a := &Agent{
		cfg: Config{Name: "h1", DataDir: t.TempDir(), Accel: "tcg", MigrationHost: "127.0.0.1",
			Image: Image{Kernel: "/nonexistent/k", Initrd: "/nonexistent/i", Cmdline: "console=ttyS0"}, Notify: rec.add},
		accel: "tcg", qemuBin: "/nonexistent/qemu-system-x86_64",
		log: slog.New(slog.NewTextHandler(&rec.log, nil)), vms: map[string]*vm{},
	}
	return a, rec
}

// recorder keeps what an agent reports: its events and its log.
type recorder struct {
	mu     sync.Mutex
	events []hostproto.Event
	log    syncBuffer
}

func (r *recorder) add(e hostproto.Event) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.events = append(r.events, e)
}

// of returns the events of kind so far.
func (r *recorder) of(kind hostproto.EventKind) []hostproto.Event {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []hostproto.Event
	for _, e := range r.events {
		if e.Kind == kind {
			out = append(out, e)
		}
	}
	return out
}

// logged counts the log lines that contain s.
func (r *recorder) logged(s string) int {
	return bytes.Count([]byte(r.log.String()), []byte(s))
}
