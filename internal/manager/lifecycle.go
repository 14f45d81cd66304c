package manager

import (
	"fmt"
	"slices"

	"github.com/vigil-project/vigil/api"
)

// The VM lifecycle: every state change a VM may make, and what makes it.
// vmOp.set refuses anything else, so a state change no rule names is a bug
// caught where it happens. docs/architecture.md shows the same table
// (TestLifecycleMatchesDocs holds the two together). A change to the same
// state with a new message is always allowed.
//
// Who owns the states: the API operations own creating, starting, stopping,
// deleting, paused, suspended and migrating (only the operation that
// entered them leaves them, or the reconciler once that operation's
// manager is gone); crash recovery owns recovering and failed; host
// failover owns recovering after a host death; the reconciler owns the
// rest — it moves a VM to whatever its host reports.
var lifecycle = []rule{
	{"create", []api.VMState{api.StateCreating}, []api.VMState{api.StateStopped}},
	{"start", []api.VMState{api.StateStopped, api.StateCrashed, api.StateFailed, api.StateSuspended, api.StateStopping}, []api.VMState{api.StateStarting}},
	{"start", []api.VMState{api.StateStarting}, []api.VMState{api.StateRunning, api.StateStopped}},
	{"stop", []api.VMState{api.StateRunning, api.StatePaused, api.StateStarting, api.StateRecovering, api.StateCrashed, api.StateFailed, api.StateStopped}, []api.VMState{api.StateStopping}},
	{"stop", []api.VMState{api.StateStopping}, []api.VMState{api.StateStopped}},
	{"delete", []api.VMState{api.StateCreating, api.StateStopped, api.StateStarting, api.StateRunning, api.StateStopping, api.StatePaused,
		api.StateSuspended, api.StateCrashed, api.StateRecovering, api.StateFailed, api.StateMigrating}, []api.VMState{api.StateDeleting}},
	{"pause", []api.VMState{api.StateRunning}, []api.VMState{api.StatePaused}},
	{"resume", []api.VMState{api.StatePaused, api.StateSuspended}, []api.VMState{api.StateRunning}},
	{"suspend", []api.VMState{api.StateRunning, api.StatePaused}, []api.VMState{api.StateSuspended}},
	{"revert", []api.VMState{api.StateRunning, api.StatePaused, api.StateStopped, api.StateSuspended, api.StateCrashed}, []api.VMState{api.StateRunning, api.StateStopped}},
	{"migrate", []api.VMState{api.StateRunning}, []api.VMState{api.StateMigrating}},
	{"migrate", []api.VMState{api.StateMigrating}, []api.VMState{api.StateRunning, api.StateCrashed}},
	{"recovery", []api.VMState{api.StateRunning, api.StatePaused, api.StateStarting, api.StateRecovering, api.StateCrashed}, []api.VMState{api.StateRecovering, api.StateCrashed, api.StateFailed}},
	{"recovery", []api.VMState{api.StateRecovering}, []api.VMState{api.StateRunning}},
	{"guest power-off", []api.VMState{api.StateRunning, api.StatePaused, api.StateRecovering, api.StateStarting}, []api.VMState{api.StateStopped}},
	{"reconciler", settled, []api.VMState{api.StateRunning, api.StatePaused, api.StateStopped, api.StateSuspended, api.StateCrashed}},
	{"host failover", settled, []api.VMState{api.StateRecovering, api.StateCrashed, api.StateStopped}},
}

// settled are the states a VM can be found in outside an operation's own
// steps (every state but creating and deleting).
var settled = []api.VMState{api.StateStopped, api.StateStarting, api.StateRunning, api.StateStopping, api.StatePaused,
	api.StateSuspended, api.StateCrashed, api.StateRecovering, api.StateFailed, api.StateMigrating}

// rule lets a VM go from any of from to any of to; by says what does it.
type rule struct {
	by   string
	from []api.VMState
	to   []api.VMState
}

// checkTransition tells whether the lifecycle lets a VM go from one state
// to another.
func checkTransition(from, to api.VMState) error {
	if from == to {
		return nil
	}
	for _, r := range lifecycle {
		if slices.Contains(r.from, from) && slices.Contains(r.to, to) {
			return nil
		}
	}
	return fmt.Errorf("%w: the lifecycle has no change from %s to %s", errLifecycle, from, to)
}

var errLifecycle = fmt.Errorf("%w: not a lifecycle transition", ErrConflict)
