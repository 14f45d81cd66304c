package hostagent

import (
	"sort"

	"github.com/vigil-project/vigil/internal/hostproto"
)

// Statuses reports every VM on this host.
func (a *Agent) Statuses() []hostproto.VMStatus {
	a.mu.Lock()
	vms := make([]*vm, 0, len(a.vms))
	for _, v := range a.vms {
		vms = append(vms, v)
	}
	a.mu.Unlock()
	out := make([]hostproto.VMStatus, 0, len(vms))
	for _, v := range vms {
		out = append(out, v.status())
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}
