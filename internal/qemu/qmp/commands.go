package qmp

import (
	"context"
	"errors"
)

// The wrappers below exist so callers get typed results and a single place
// documents each command's quirks; anything not covered here can still go
// through Run.

// Status is the result of query-status.
type Status struct {
	Status  string `json:"status"`
	Running bool   `json:"running"`
}

// QueryStatus reports the VM run state (e.g. "running", "paused",
// "prelaunch", "shutdown").
func (m *Monitor) QueryStatus(ctx context.Context) (Status, error) {
	var s Status
	err := m.Run(ctx, "query-status", nil, &s)
	return s, err
}

// QueryVersion asks QEMU for its version. Version() already has the value
// from the greeting; this exists for callers that want a live round trip,
// e.g. as a cheap liveness probe.
func (m *Monitor) QueryVersion(ctx context.Context) (Version, error) {
	var v versionInfo
	if err := m.Run(ctx, "query-version", nil, &v); err != nil {
		return Version{}, err
	}
	return v.version(), nil
}

// Stop pauses all vCPUs.
func (m *Monitor) Stop(ctx context.Context) error {
	return m.Run(ctx, "stop", nil, nil)
}

// Cont resumes the vCPUs after Stop (or after -S).
func (m *Monitor) Cont(ctx context.Context) error {
	return m.Run(ctx, "cont", nil, nil)
}

// AnnounceSelf makes QEMU send gratuitous ARP (RARP) frames for every NIC,
// a few times over about a second, so that bridges and switches learn at
// once where a guest that moved now is.
func (m *Monitor) AnnounceSelf(ctx context.Context) error {
	return m.Run(ctx, "announce-self", map[string]int{"initial": 50, "max": 550, "rounds": 5, "step": 100}, nil)
}

// SystemPowerdown sends an ACPI power-button press; the guest decides
// whether and when to shut down, so success means only that the request
// was delivered.
func (m *Monitor) SystemPowerdown(ctx context.Context) error {
	return m.Run(ctx, "system_powerdown", nil, nil)
}

// Quit makes QEMU exit immediately. QEMU may drop the connection before or
// right after replying, so the connection closing counts as success: it is
// exactly the outcome that was asked for.
func (m *Monitor) Quit(ctx context.Context) error {
	err := m.Run(ctx, "quit", nil, nil)
	if errors.Is(err, ErrClosed) {
		return nil
	}
	return err
}

// HMP runs a human monitor command line and returns its text output. It is
// an escape hatch for functionality that has no QMP equivalent; its output
// format is not stable across QEMU versions.
func (m *Monitor) HMP(ctx context.Context, cmdline string) (string, error) {
	var out string
	err := m.Run(ctx, "human-monitor-command", map[string]string{"command-line": cmdline}, &out)
	return out, err
}

// BlockStats is one entry of query-blockstats. Device is empty for nodes
// created with -blockdev, which are identified by NodeName instead.
type BlockStats struct {
	Device   string           `json:"device"`
	NodeName string           `json:"node-name"`
	Stats    BlockDeviceStats `json:"stats"`
}

// BlockDeviceStats holds the cumulative I/O counters of a block device.
type BlockDeviceStats struct {
	RdBytes      uint64 `json:"rd_bytes"`
	WrBytes      uint64 `json:"wr_bytes"`
	RdOperations uint64 `json:"rd_operations"`
	WrOperations uint64 `json:"wr_operations"`
}

// QueryBlockStats returns I/O counters for every block device.
func (m *Monitor) QueryBlockStats(ctx context.Context) ([]BlockStats, error) {
	var s []BlockStats
	err := m.Run(ctx, "query-blockstats", nil, &s)
	return s, err
}

// CPU is one entry of query-cpus-fast. ThreadID is the host thread backing
// the vCPU, which is what CPU pinning needs.
type CPU struct {
	CPUIndex int    `json:"cpu-index"`
	ThreadID int    `json:"thread-id"`
	QOMPath  string `json:"qom-path"`
}

// QueryCPUsFast lists vCPUs without interrupting them (unlike the removed
// query-cpus).
func (m *Monitor) QueryCPUsFast(ctx context.Context) ([]CPU, error) {
	var c []CPU
	err := m.Run(ctx, "query-cpus-fast", nil, &c)
	return c, err
}
