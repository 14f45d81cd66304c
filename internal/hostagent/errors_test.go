package hostagent

import (
	"context"
	"errors"
	"testing"

	"github.com/vigil-project/vigil/internal/hostproto"
)

// TestMigrateOutRefusesWhatIsNotAHost: the destination of a migration is
// an IP address and a port the manager gives, never a URI: exec:, unix:
// and host names are refused before anything runs.
func TestMigrateOutRefusesWhatIsNotAHost(t *testing.T) {
	a := &Agent{cfg: Config{MigrationTLSDir: "/nonexistent"}, vms: map[string]*vm{}}
	for _, r := range []hostproto.MigrateOutRequest{
		{VM: "v", Dest: "h2", Addr: "exec:touch /tmp/pwned", Port: 1},
		{VM: "v", Dest: "h2", Addr: "unix:/tmp/s", Port: 1},
		{VM: "v", Dest: "h2", Addr: "localhost", Port: 4444},
		{VM: "v", Dest: "h2", Addr: "127.0.0.1", Port: 0},
		{VM: "v", Dest: "../h2", Addr: "127.0.0.1", Port: 4444},
		{VM: "..", Dest: "h2", Addr: "127.0.0.1", Port: 4444},
	} {
		if _, err := a.MigrateOut(context.Background(), r); !errors.Is(err, ErrInvalid) {
			t.Errorf("MigrateOut(%+v) = %v, want invalid", r, err)
		}
	}
	if _, err := a.Start(context.Background(), hostproto.VMRef{VM: ".."}); !errors.Is(err, ErrInvalid) {
		t.Errorf("a vm named ..: %v", err)
	}
}
