package hostagent

import (
	"fmt"
	"regexp"
	"strings"

	"github.com/vigil-project/vigil/internal/hostproto"
)

// The errors of host operations are declared with the protocol, so that
// their kinds reach the manager over the wire.
var (
	ErrUnknownVM    = hostproto.ErrUnknownVM
	ErrNotRunning   = hostproto.ErrNotRunning
	ErrRunning      = hostproto.ErrRunning
	ErrNotOwner     = hostproto.ErrNotOwner
	ErrDiskInUse    = hostproto.ErrDiskInUse
	ErrWrongPool    = hostproto.ErrWrongPool
	ErrBadState     = hostproto.ErrBadState
	ErrNoGuestAgent = hostproto.ErrNoGuestAgent
	ErrNoSnapshot   = hostproto.ErrNoSnapshot
	ErrCutOff       = hostproto.ErrCutOff
	ErrInvalid      = hostproto.ErrInvalid
)

// none adapts an operation that answers nothing.
func none(err error) (hostproto.None, error) { return hostproto.None{}, err }

var _ hostproto.Handler = (*Agent)(nil)

var dnsLabel = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)

// checkName refuses a VM or snapshot name that is not a DNS label: names
// become paths under the data dir and the pool, so "..", "a/b" or "" must
// never reach the file system.
func checkName(what, name string) error {
	if !dnsLabel.MatchString(name) {
		return fmt.Errorf("%w: %s name %q is not a DNS label", ErrInvalid, what, name)
	}
	if what == "snapshot" && strings.HasPrefix(name, checkpointPrefix) {
		return fmt.Errorf("%w: snapshot names starting with %q are kept for checkpoints of protected vms", ErrInvalid, checkpointPrefix)
	}
	return nil
}
