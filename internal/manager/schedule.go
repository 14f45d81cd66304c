package manager

import (
	"fmt"
	"sort"
	"strings"

	"github.com/vigil-project/vigil/api"
)

// Overcommit bounds how much a host is promised beyond what it has.
type Overcommit struct {
	// Memory is the ratio of reservable to physical memory (1.0: never promise more than exists).
	Memory float64
	// CPU is the ratio of reservable vCPUs to host CPUs.
	CPU float64
}

// DefaultOvercommit never promises more memory than a host has, and allows
// four vCPUs per host CPU (vCPUs are time-shared; memory is not).
var DefaultOvercommit = Overcommit{Memory: 1.0, CPU: 4.0}

// candidate is a host as the scheduler sees it.
type candidate struct {
	host       api.Host
	enabled    bool
	usedMemory int64
	usedCPUs   int
}

// need is what a VM asks of a host.
type need struct {
	mem  int64
	cpus int
	// pin, if set, names the only acceptable host.
	pin string
	// pool, if set, is the storage pool the host must mount (the VM's
	// disk is there).
	pool string
}

// place picks a host for a VM: an up, enabled host (mounting the VM's
// pool, if it has one) with enough unreserved memory and CPU, the one with
// the most free memory first (spreading load). The error names what is
// missing where.
func place(cands []candidate, n need, oc Overcommit) (string, error) {
	mem, cpus, pin := n.mem, n.cpus, n.pin
	if oc.Memory <= 0 {
		oc.Memory = DefaultOvercommit.Memory
	}
	if oc.CPU <= 0 {
		oc.CPU = DefaultOvercommit.CPU
	}
	type fit struct {
		name    string
		freeMem int64
	}
	var fits []fit
	var why []string
	found := false
	for _, c := range cands {
		if pin != "" && c.host.Name != pin {
			continue
		}
		found = true
		freeMem := int64(float64(c.host.MemoryBytes)*oc.Memory) - c.usedMemory
		freeCPU := int(float64(c.host.CPUs)*oc.CPU) - c.usedCPUs
		switch {
		case c.host.State != "up":
			why = append(why, fmt.Sprintf("%s is %s", c.host.Name, c.host.State))
		case !c.enabled:
			why = append(why, fmt.Sprintf("%s is drained", c.host.Name))
		case n.pool != "" && c.host.StoragePool != n.pool:
			why = append(why, fmt.Sprintf("%s does not mount storage pool %s", c.host.Name, n.pool))
		case n.pool != "" && c.host.PoolLocks == "not-shared":
			// The lease and the disk-lock probe would not see another host's
			// copy: a move there could run a VM twice.
			why = append(why, fmt.Sprintf("%s's storage pool does not share locks between hosts (use NFSv4 or CephFS)", c.host.Name))
		case freeMem < mem:
			why = append(why, fmt.Sprintf("%s has %s of memory unreserved", c.host.Name, size(max(freeMem, 0))))
		case freeCPU < cpus:
			why = append(why, fmt.Sprintf("%s has %d vCPUs unreserved", c.host.Name, max(freeCPU, 0)))
		default:
			fits = append(fits, fit{c.host.Name, freeMem})
		}
	}
	if pin != "" && !found {
		return "", errorf(ErrInvalid, "no host named %s: see 'vigil host list'", pin)
	}
	if len(fits) == 0 {
		if len(why) == 0 {
			return "", errorf(ErrUnavailable, "no hosts are registered: start a host agent")
		}
		return "", errorf(ErrConflict, "no host can take a vm of %s and %d vCPUs: %s", size(mem), cpus, strings.Join(why, "; "))
	}
	sort.SliceStable(fits, func(i, j int) bool { return fits[i].freeMem > fits[j].freeMem })
	return fits[0].name, nil
}
