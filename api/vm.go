// Package api holds the wire types of Vigil's REST API (/v1/...). The server,
// the Go client and the CLI share them, so a field means the same everywhere.
package api

import "time"

// VMState is the lifecycle state of a virtual server as shown to users.
// The manager owns every transition; host agents only report what runs.
type VMState string

const (
	StateCreating   VMState = "creating"
	StateStopped    VMState = "stopped"
	StateStarting   VMState = "starting"
	StateRunning    VMState = "running"
	StateStopping   VMState = "stopping"
	StatePaused     VMState = "paused"
	StateSuspended  VMState = "suspended"
	StateCrashed    VMState = "crashed"
	StateRecovering VMState = "recovering"
	StateFailed     VMState = "failed"
	StateMigrating  VMState = "migrating"
	StateDeleting   VMState = "deleting"
)

// VMCreateRequest is the body of POST /v1/vms.
type VMCreateRequest struct {
	// Name is a DNS label: 1-63 of [a-z0-9-], not starting or ending with '-'.
	Name        string `json:"name"`
	MemoryBytes int64  `json:"memory_bytes"`
	CPUs        int    `json:"cpus"`
	DiskBytes   int64  `json:"disk_bytes"`
	// Start boots the VM right after it is created.
	Start bool `json:"start,omitempty"`
	// Policy is the crash recovery policy; nil means the defaults.
	Policy *RecoveryPolicy `json:"policy,omitempty"`
	// Host pins the VM to this host; empty lets the scheduler choose.
	Host string `json:"host,omitempty"`
	// Image, if set, names an imported OS image (qcow2 or raw): the VM's
	// disk is a copy-on-write overlay on it, grown to DiskBytes (0: the
	// image's size). Without Image or ISO the VM boots the built-in guest.
	Image string `json:"image,omitempty"`
	// ISO, if set, names an imported ISO attached as a CD-ROM (an
	// installer), with an empty disk of DiskBytes.
	ISO string `json:"iso,omitempty"`
	// UserData is cloud-init user-data for a VM from an image (a
	// #cloud-config document, a script, ...); SSHKeys, if UserData is
	// empty, makes one that installs these public keys.
	UserData string   `json:"user_data,omitempty"`
	SSHKeys  []string `json:"ssh_keys,omitempty"`
	// Firmware is bios (default) or uefi.
	Firmware string `json:"firmware,omitempty"`
	// NICs puts the VM on networks (none: the cluster's default network,
	// or QEMU's user-mode network where there is none). "user" names
	// user-mode networking explicitly.
	NICs []NICRequest `json:"nics,omitempty"`
	// Publish forwards host ports to the VM (on a network, not user-mode).
	Publish []PortPublish `json:"publish,omitempty"`
}

// VMConfigRequest is the body of PATCH /v1/vms/{name}: what the guest
// gets at its next boot.
type VMConfigRequest struct {
	// UserData replaces the cloud-init user-data (empty: none) under a new
	// instance id, so cloud-init applies it at the next boot; SSHKeys
	// instead makes user-data that installs these keys.
	UserData *string  `json:"user_data,omitempty"`
	SSHKeys  []string `json:"ssh_keys,omitempty"`
	// Eject empties the installer's CD-ROM, at once if the VM runs: the
	// installed system boots from the disk.
	Eject bool `json:"eject,omitempty"`
}

// Image is an OS image imported into the cluster.
type Image struct {
	Name        string    `json:"name"`
	Digest      string    `json:"digest"` // sha256:HEX
	Format      string    `json:"format"` // qcow2, raw or iso
	VirtualSize int64     `json:"virtual_size"`
	FileSize    int64     `json:"file_size"`
	Created     time.Time `json:"created"`
	// VMs lists the VMs whose disk (or CD-ROM) is made from it.
	VMs []string `json:"vms"`
}

// RecoveryPolicy says what Vigil does when a VM's guest crashes or hangs.
// Zero fields take the defaults shown.
type RecoveryPolicy struct {
	// Recovery is "restart" (default: a fresh boot on the same host) or "none".
	Recovery string `json:"recovery,omitempty"`
	// HangTimeoutSeconds: no heartbeats and no sign of activity for this
	// long means hung (default 10).
	HangTimeoutSeconds int `json:"hang_timeout_seconds,omitempty"`
	// MinUptimeSeconds: a guest is not judged hung this soon after a start (default 30).
	MinUptimeSeconds int `json:"min_uptime_seconds,omitempty"`
	// MaxRestarts within RestartWindowSeconds (default 3 per 3600); one
	// more crash and the VM goes to failed and stays there.
	MaxRestarts          int `json:"max_restarts,omitempty"`
	RestartWindowSeconds int `json:"restart_window_seconds,omitempty"`
}

// Incident is a crash or hang that Vigil detected, and what it did.
type Incident struct {
	ID   string `json:"id"`
	VM   string `json:"vm"`
	Kind string `json:"kind"` // exit, panic, hang or host-failure
	// Host is where it happened (for a host failure: the host that died).
	Host        string     `json:"host,omitempty"`
	DetectedAt  time.Time  `json:"detected_at"`
	Action      string     `json:"action"` // restart, none, gave-up
	RecoveredAt *time.Time `json:"recovered_at,omitempty"`
	// RecoveredInMS is from detection to the restarted guest's first heartbeat.
	RecoveredInMS float64  `json:"recovered_in_ms,omitempty"`
	Evidence      Evidence `json:"evidence"`
	// Timeline of a host failure: last heartbeat, declared dead, fencing,
	// restarted on, guest back.
	Timeline []TimelineEntry `json:"timeline,omitempty"`
}

// TimelineEntry is one step of an incident.
type TimelineEntry struct {
	Time   time.Time `json:"time"`
	Event  string    `json:"event"`
	Detail string    `json:"detail,omitempty"`
}

// Evidence is what the host saw when it judged.
type Evidence struct {
	LastHeartbeat     *time.Time `json:"last_heartbeat,omitempty"`
	HeartbeatSilenceS float64    `json:"heartbeat_silence_seconds"`
	ActivitySilenceS  float64    `json:"activity_silence_seconds"`
	CPUTimeMS         int64      `json:"cpu_time_ms"`
	DiskOps           uint64     `json:"disk_ops"`
	RunState          string     `json:"run_state,omitempty"`
	Detail            string     `json:"detail,omitempty"`
	Console           []string   `json:"console,omitempty"`
}

// FaultRequest is the body of POST /v1/vms/{name}/fault.
type FaultRequest struct {
	// Kind is panic, hang, agent-stop or kill.
	Kind string `json:"kind"`
}

// VM is a virtual server as the API reports it: its definition, its state
// and what its guest agent last said.
type VM struct {
	Name        string  `json:"name"`
	State       VMState `json:"state"`
	Host        string  `json:"host"`
	PID         int     `json:"pid,omitempty"`
	MemoryBytes int64   `json:"memory_bytes"`
	CPUs        int     `json:"cpus"`
	DiskBytes   int64   `json:"disk_bytes"`
	// Endpoint is where the guest's port 80 is reached from its host: its
	// first NIC's address, or on user-mode networking a port of the host's
	// 127.0.0.1 forwarded to it; empty when the address comes from an
	// operator's DHCP (see Guest.Addresses).
	Endpoint  string    `json:"endpoint"`
	CreatedAt time.Time `json:"created_at"`
	// Guest is nil until the guest agent has sent a heartbeat in this boot.
	Guest *GuestInfo `json:"guest,omitempty"`
	// Message explains the state when it needs explaining (for example why it crashed).
	Message string `json:"message,omitempty"`
	// CurrentSnapshot is the snapshot the VM's state descends from (the
	// last one taken or reverted to); new snapshots become its children.
	CurrentSnapshot string `json:"current_snapshot,omitempty"`
	// LastOperation reports timings of the last state save or restore.
	LastOperation *Operation `json:"last_operation,omitempty"`
	// Policy is the crash recovery policy in force (defaults filled in).
	Policy RecoveryPolicy `json:"policy"`
	// Condition flags a problem short of a crash, e.g. "agent-unwell".
	Condition string `json:"condition,omitempty"`
	// StoragePool is the pool holding the VM's disk (it can move to any
	// host of the pool); empty when the disk is local to its host.
	StoragePool string `json:"storage_pool,omitempty"`
	// Image and ISO name what the VM was made from (empty: the built-in
	// guest); Firmware is bios or uefi.
	Image    string `json:"image,omitempty"`
	ISO      string `json:"iso,omitempty"`
	Firmware string `json:"firmware,omitempty"`
	// NICs are the VM's network cards (none: QEMU's user-mode network).
	NICs    []NIC         `json:"nics,omitempty"`
	Publish []PortPublish `json:"publish,omitempty"`
	// Protection is set on a protected VM (see ProtectRequest).
	Protection *Protection `json:"protection,omitempty"`
}

// ProtectRequest protects a VM with a synchronized standby on another host
// of its storage pool: the guest is checkpointed there every interval and,
// if its host dies, continues there from the last checkpoint without a
// reboot.
type ProtectRequest struct {
	// SecondaryHost names the standby's host; empty lets the scheduler pick
	// one with room (the VM's memory is reserved there).
	SecondaryHost string `json:"secondary_host,omitempty"`
	// IntervalMS is the time between checkpoint starts (default 500).
	IntervalMS int64 `json:"interval_ms,omitempty"`
}

// Protection is the state of a VM's synchronized standby.
type Protection struct {
	// State is syncing (no checkpoint committed yet), protected, degraded
	// (no usable standby now: Message says why), failing-over or
	// re-protecting (a new standby is being made after a loss).
	State         string    `json:"state"`
	Since         time.Time `json:"since"`
	Message       string    `json:"message,omitempty"`
	SecondaryHost string    `json:"secondary_host,omitempty"`
	IntervalMS    int64     `json:"interval_ms"`
	// LastCheckpoint is when the standby last committed a checkpoint; RPOMS
	// is how much guest time a failover now would lose at most.
	LastCheckpoint *time.Time `json:"last_checkpoint,omitempty"`
	RPOMS          float64    `json:"rpo_ms,omitempty"`
	Checkpoints    int64      `json:"checkpoints,omitempty"`
	// PauseP50MS and PauseP99MS are the guest's stops per checkpoint.
	PauseP50MS float64 `json:"pause_p50_ms,omitempty"`
	PauseP99MS float64 `json:"pause_p99_ms,omitempty"`
	// BytesPerCheckpoint is the size of the last checkpoint's memory.
	BytesPerCheckpoint int64 `json:"bytes_per_checkpoint,omitempty"`
	// CheckpointMS is how long the last checkpoint took, start to commit.
	CheckpointMS float64 `json:"checkpoint_ms,omitempty"`
	// SecondaryHeardAt is when the primary last heard from the secondary
	// directly (the heartbeat between the two hosts).
	SecondaryHeardAt *time.Time `json:"secondary_heard_at,omitempty"`
}

// Operation reports how a state operation went.
type Operation struct {
	Action string `json:"action"`
	// DurationMS is 0 when it was not known as the operation was recorded:
	// a pause or resume in memory records its outcome while the host acts
	// (the answer to the call has the duration).
	DurationMS float64 `json:"duration_ms"`
	// PausedMS is how long the guest's CPUs were stopped by it.
	PausedMS float64 `json:"paused_ms,omitempty"`
	// FrozenMS is how long the guest's file systems were frozen (a
	// quiesced snapshot): writes waited, the CPUs ran.
	FrozenMS float64 `json:"frozen_ms,omitempty"`
	Bytes    int64   `json:"bytes,omitempty"`
	// Note says what the operation could not do as asked, and why.
	Note string `json:"note,omitempty"`
}

// GuestInfo is the latest heartbeat of a VM's guest agent.
type GuestInfo struct {
	BootID        string    `json:"boot_id"`
	Seq           uint64    `json:"seq"`
	UptimeSeconds float64   `json:"uptime_seconds"`
	Load1         float64   `json:"load1"`
	MemUsedBytes  uint64    `json:"mem_used_bytes"`
	LastHeartbeat time.Time `json:"last_heartbeat"`
	// Agent is who answers in the guest: "vigil" (vigil-guest) or
	// "qemu-ga" (the distribution's qemu-guest-agent).
	Agent string `json:"agent,omitempty"`
	// OS, Hostname and Addresses are what qemu-guest-agent tells.
	OS        string   `json:"os,omitempty"`
	Hostname  string   `json:"hostname,omitempty"`
	Addresses []string `json:"addresses,omitempty"`
}

// Action is a state change asked of a VM through PUT /v1/vms/{name}/state.
type Action string

const (
	ActionStart   Action = "start"
	ActionStop    Action = "stop"
	ActionRestart Action = "restart"
	// ActionPause stops the guest's CPUs in memory, or with ToDisk saves
	// its whole state to a state file and ends QEMU (state suspended).
	ActionPause Action = "pause"
	// ActionResume continues a paused VM or restores a suspended one.
	ActionResume Action = "resume"
)

// VMStateRequest is the body of PUT /v1/vms/{name}/state.
type VMStateRequest struct {
	Action Action `json:"action"`
	// TimeoutSeconds bounds a graceful stop before the process is killed (default 30).
	TimeoutSeconds int `json:"timeout_seconds,omitempty"`
	// Force kills the QEMU process at once instead of asking the guest to power down.
	Force bool `json:"force,omitempty"`
	// ToDisk (pause) saves the state to disk and frees the VM's host memory and CPU.
	ToDisk bool `json:"to_disk,omitempty"`
	// DiscardState (resume of a suspended VM) deletes the saved state and cold-boots from the disk.
	DiscardState bool `json:"discard_state,omitempty"`
}

// Host is a hypervisor host as the API reports it.
type Host struct {
	Name          string    `json:"name"`
	State         string    `json:"state"`
	Accel         string    `json:"accel"`
	CPUs          int       `json:"cpus"`
	MemoryBytes   int64     `json:"memory_bytes"`
	VMs           int       `json:"vms"`
	QEMUVersion   string    `json:"qemu_version"`
	LastHeartbeat time.Time `json:"last_heartbeat"`
	// StoragePool is the id of the shared storage pool the host mounts;
	// VMs on it can be restarted or migrated to any host with the same pool.
	StoragePool string `json:"storage_pool,omitempty"`
	// PoolLocks says whether the pool's file system was seen to share
	// locks between hosts ("shared", "not-shared", "unknown" before another
	// live host was seen): VM leases depend on it.
	PoolLocks string `json:"pool_locks,omitempty"`
	// Drained hosts take no new VMs (see 'vigil host drain').
	Drained bool `json:"drained,omitempty"`
	// Reserved is what the VMs placed on the host hold: the memory of every
	// VM defined there (and of the standbys it keeps), the vCPUs of those
	// meant to run.
	ReservedMemoryBytes int64 `json:"reserved_memory_bytes"`
	ReservedCPUs        int   `json:"reserved_cpus"`
}

// Event is one entry of the event stream (GET /v1/events).
type Event struct {
	// Seq orders events; a client can resume with ?since=Seq.
	Seq     uint64    `json:"seq"`
	Time    time.Time `json:"time"`
	Type    string    `json:"type"` // e.g. "vm.created", "vm.state", "vm.guest-ready", "host.up"
	VM      string    `json:"vm,omitempty"`
	Host    string    `json:"host,omitempty"`
	State   VMState   `json:"state,omitempty"`
	Message string    `json:"message,omitempty"`
	// Audit is set on events of type "audit": a mutating call.
	Audit *AuditEntry `json:"audit,omitempty"`
}

// Error is the body of every non-2xx answer.
type Error struct {
	// Error is one line: what is wrong and what to do.
	Error string `json:"error"`
	// Code is a stable machine-readable reason, e.g. "not_found", "conflict", "invalid".
	Code string `json:"code"`
}

// SnapshotCreateRequest is the body of POST /v1/vms/{name}/snapshots.
type SnapshotCreateRequest struct {
	Name string `json:"name"`
	// NoMemory takes a disk-only snapshot of a running VM: with
	// qemu-guest-agent answering, its file systems are frozen around it
	// (application-consistent) unless NoQuiesce; otherwise crash-consistent.
	NoMemory  bool `json:"no_memory,omitempty"`
	NoQuiesce bool `json:"no_quiesce,omitempty"`
}

// Snapshot is one restore point of a VM.
type Snapshot struct {
	Name    string    `json:"name"`
	Parent  string    `json:"parent,omitempty"`
	Created time.Time `json:"created"`
	// IncludesMemory: reverting resumes the guest at the snapshot's instant.
	IncludesMemory bool `json:"includes_memory"`
	// Consistency is "memory" (a full restore point), "application" (the
	// disk with the guest's file systems frozen by qemu-guest-agent, or of
	// a stopped VM) or "crash" (the disk as a power cut would leave it).
	Consistency string `json:"consistency,omitempty"`
	// SizeBytes is the space only this snapshot holds (freed by deleting it).
	SizeBytes int64 `json:"size_bytes"`
	// Current marks the snapshot the VM's present state descends from.
	Current bool `json:"current"`
	// VMState is what the VM was doing when the snapshot was taken.
	VMState     VMState `json:"vm_state"`
	MemoryBytes int64   `json:"memory_bytes"`
	CPUs        int     `json:"cpus"`
	// Operation reports how taking it went (pause and total time).
	Operation *Operation `json:"operation,omitempty"`
}

// SnapshotList is the answer of GET /v1/vms/{name}/snapshots.
type SnapshotList struct {
	VM         string     `json:"vm"`
	Snapshots  []Snapshot `json:"snapshots"`
	TotalBytes int64      `json:"total_bytes"`
}

// ExecRequest is the body of POST /v1/vms/{name}/exec: a command for the
// guest's /bin/sh -c, run by the guest agent.
type ExecRequest struct {
	Command        string `json:"command"`
	TimeoutSeconds int    `json:"timeout_seconds,omitempty"`
	// Background starts the command detached and answers at once.
	Background bool `json:"background,omitempty"`
}

// ExecResult is the outcome of an ExecRequest.
type ExecResult struct {
	ExitCode  int    `json:"exit_code"`
	Output    string `json:"output"`
	Truncated bool   `json:"truncated,omitempty"`
	Error     string `json:"error,omitempty"`
}

// MigrateRequest is the body of POST /v1/vms/{name}/migrate.
type MigrateRequest struct {
	// To names the destination host; empty lets the scheduler choose.
	To string `json:"to,omitempty"`
}

// DrainResult reports what `host drain` did with each VM of the host.
type DrainResult struct {
	Host   string      `json:"host"`
	Moved  []DrainMove `json:"moved"`
	Stayed []DrainStay `json:"stayed"`
}

// DrainMove is a VM that left the drained host.
type DrainMove struct {
	VM string `json:"vm"`
	To string `json:"to"`
	// Live is set for a running VM migrated live; DowntimeMS is its pause.
	Live       bool    `json:"live"`
	DowntimeMS float64 `json:"downtime_ms,omitempty"`
}

// DrainStay is a VM that could not leave, and why.
type DrainStay struct {
	VM     string `json:"vm"`
	Reason string `json:"reason"`
}

// UsageHistory is what a running VM used lately, as its host sampled it
// (every few seconds, the last quarter of an hour at most; it starts again
// when the VM moves or its host agent restarts). The counters are
// cumulative since the VM's QEMU started: a counter that goes down means a
// new QEMU, not negative use.
type UsageHistory struct {
	VM      string        `json:"vm"`
	Host    string        `json:"host"`
	Samples []UsageSample `json:"samples"`
}

// UsageSample is one reading of a VM's counters.
type UsageSample struct {
	Time           time.Time `json:"time"`
	CPUSeconds     float64   `json:"cpu_seconds"`
	MemUsedBytes   uint64    `json:"mem_used_bytes,omitempty"` // as the guest agent reports it
	DiskReadBytes  uint64    `json:"disk_read_bytes"`
	DiskWriteBytes uint64    `json:"disk_write_bytes"`
	NetRxBytes     uint64    `json:"net_rx_bytes"`
	NetTxBytes     uint64    `json:"net_tx_bytes"`
}

// ConsoleTicket opens a VM's console WebSocket once
// (GET /v1/vms/{name}/vnc/websocket?ticket=...), within ExpiresInSeconds.
type ConsoleTicket struct {
	Ticket           string `json:"ticket"`
	ExpiresInSeconds int    `json:"expires_in_seconds"`
}

// SignInLink is a code for a dashboard sign-in link
// (https://MANAGER/ui/#code=CODE), good once within ExpiresInSeconds: whoever
// opens it gets a token of the role of the token that asked for it.
type SignInLink struct {
	Code             string `json:"code"`
	ExpiresInSeconds int    `json:"expires_in_seconds"`
}

// SignInRequest is the body of POST /v1/ui/sessions: a sign-in link's code,
// exchanged for a token (api.TokenCreated) that lasts a working day.
type SignInRequest struct {
	Code string `json:"code"`
}
