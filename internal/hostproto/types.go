// Package hostproto holds what the manager and a host agent say to each
// other: the VM definitions a host runs, what it reports back, and its
// events. The in-process dev mode passes these values directly; a remote
// host transport carries the same types as JSON.
package hostproto

import (
	"time"

	"github.com/vigil-project/vigil/api"
)

// VMSpec is the hardware definition of a VM as a host needs it.
type VMSpec struct {
	Name        string `json:"name"`
	UUID        string `json:"uuid"`
	MemoryBytes int64  `json:"memory_bytes"`
	CPUs        int    `json:"cpus"`
	DiskBytes   int64  `json:"disk_bytes"`
	// HostPort on 127.0.0.1 is forwarded to the guest's port 80.
	HostPort int `json:"host_port"`
	// Health judgement (see internal/health); zero means the defaults.
	HangTimeoutSeconds int `json:"hang_timeout_seconds,omitempty"`
	MinUptimeSeconds   int `json:"min_uptime_seconds,omitempty"`
	// Pool is the id of the storage pool holding the VM's disk and state
	// files; empty means the host's local data dir (the VM cannot move).
	Pool string `json:"pool,omitempty"`
	// Epoch grows each time the VM is given to another host. A host starts
	// QEMU only while the pool's owner file names it with this epoch.
	Epoch int64 `json:"epoch,omitempty"`
	// Image, if set, is the OS image the disk is an overlay on; ISO, an
	// installer attached as a CD-ROM. Neither: the built-in guest, booted
	// directly from its kernel.
	Image *ImageRef `json:"image,omitempty"`
	ISO   *ImageRef `json:"iso,omitempty"`
	// Firmware is bios (or empty) or uefi.
	Firmware string `json:"firmware,omitempty"`
	// Ejected: the ISO's CD-ROM is empty (the installed system boots from
	// its disk).
	Ejected bool `json:"ejected,omitempty"`
	// CloudInit, if set, is served to the guest as a NoCloud volume.
	CloudInit *CloudInit `json:"cloud_init,omitempty"`
	// QGAPort gives the VM the port of qemu-guest-agent (every VM made
	// since Vigil knows it; older VMs keep their hardware, so that their
	// saved states still load).
	QGAPort bool `json:"qga_port,omitempty"`
	// RAMPad gives the VM a few KiB of RAM above MemoryBytes so that its
	// memory can be copied while it runs under TCG (qemu.LivePrecopySafe);
	// every VM made since Vigil knows it has it, older VMs keep their
	// hardware, as with QGAPort.
	RAMPad bool `json:"ram_pad,omitempty"`
	// NICs are the VM's network cards, in PCI order; none means QEMU's
	// user-mode network with HostPort forwarded. Each carries its network
	// as it stands, so a host needs nothing else to wire it.
	NICs []NIC `json:"nics,omitempty"`
}

// NIC is a VM network card on a network.
type NIC struct {
	Network NetworkSpec `json:"network"`
	MAC     string      `json:"mac"`
	// IP is the address reserved for the NIC (empty: none, on an
	// operator's bridge).
	IP      string    `json:"ip,omitempty"`
	Publish []Publish `json:"publish,omitempty"`
}

// NetworkSpec is a network as a host wires it.
type NetworkSpec struct {
	Name string `json:"name"`
	// Bridge is the operator's bridge; empty for a managed network.
	Bridge  string   `json:"bridge,omitempty"`
	Subnet  string   `json:"subnet,omitempty"`
	Gateway string   `json:"gateway,omitempty"`
	NAT     bool     `json:"nat,omitempty"`
	DNS     []string `json:"dns,omitempty"`
	VNI     int      `json:"vni,omitempty"`
	// Peers are the underlay addresses of the other hosts (on other
	// machines) that the network's VXLAN reaches.
	Peers []string `json:"peers,omitempty"`
}

// Publish forwards a host port to a NIC's address.
type Publish struct {
	Proto     string `json:"proto,omitempty"`
	HostPort  int    `json:"host_port"`
	GuestPort int    `json:"guest_port"`
}

// ImageRef names an image blob by its content.
type ImageRef struct {
	Name   string `json:"name"`
	Digest string `json:"digest"` // sha256:HEX
	Format string `json:"format"` // qcow2, raw or iso
	Size   int64  `json:"size"`   // the file's
}

// CloudInit is what a VM's NoCloud volume says.
type CloudInit struct {
	// InstanceID is stable for the VM's life; a new one makes cloud-init
	// run its once-per-instance modules again (new user-data).
	InstanceID    string `json:"instance_id"`
	UserData      string `json:"user_data,omitempty"`
	NetworkConfig string `json:"network_config,omitempty"`
}

// VMStatus is what a host knows about one of its VMs right now.
type VMStatus struct {
	Name    string `json:"name"`
	Running bool   `json:"running"`
	PID     int    `json:"pid,omitempty"`
	// RunState is QEMU's own run state (running, paused, shutdown, ...).
	RunState string         `json:"run_state,omitempty"`
	Guest    *api.GuestInfo `json:"guest,omitempty"`
	// StartedAt is when this QEMU process was started or adopted.
	StartedAt time.Time `json:"started_at,omitzero"`
	// SavedState is set when a state file from a suspend waits to be resumed.
	SavedState bool `json:"saved_state,omitempty"`
	// Busy names the host operation in progress on the VM, if any (a save,
	// a migration): a manager settling what another left waits for it.
	Busy string `json:"busy,omitempty"`
	// Protection is set while this host sends checkpoints of the VM.
	Protection *ProtectionStatus `json:"protection,omitempty"`
	// Usage is what the running VM has used since its QEMU started, as
	// the health watch last sampled it.
	Usage *VMUsage `json:"usage,omitempty"`
}

// VMUsage are a running VM's cumulative counters: its vCPUs' time, its
// disks' and its network cards' traffic (network only on taps; the guest's
// view: what it sent and received).
type VMUsage struct {
	CPUSeconds     float64 `json:"cpu_seconds"`
	DiskReadBytes  uint64  `json:"disk_read_bytes"`
	DiskWriteBytes uint64  `json:"disk_write_bytes"`
	DiskReadOps    uint64  `json:"disk_read_ops"`
	DiskWriteOps   uint64  `json:"disk_write_ops"`
	NetRxBytes     uint64  `json:"net_rx_bytes"`
	NetTxBytes     uint64  `json:"net_tx_bytes"`
	NetRxPackets   uint64  `json:"net_rx_packets"`
	NetTxPackets   uint64  `json:"net_tx_packets"`
}

// ProtectRequest makes the VM's host checkpoint it to Secondary, reached
// at Addr (host:port), every Interval. Generation numbers the pairing: a
// stream of another generation is refused by the secondary.
type ProtectRequest struct {
	VM         string `json:"vm"`
	Secondary  string `json:"secondary"`
	Addr       string `json:"addr"`
	IntervalMS int64  `json:"interval_ms"`
	Generation int64  `json:"generation"`
}

// StandbyRequest makes a host keep the standby of VM for Primary.
type StandbyRequest struct {
	VM         string `json:"vm"`
	Primary    string `json:"primary"`
	Generation int64  `json:"generation"`
	// MemoryBytes is the VM's memory: a checkpoint much bigger is refused.
	MemoryBytes int64 `json:"memory_bytes,omitempty"`
}

// ActivateRequest runs a standby. Run, if set, is the run of the primary's
// QEMU the checkpoint must come from (the manager's latest knowledge).
type ActivateRequest struct {
	VM  string `json:"vm"`
	Run string `json:"run,omitempty"`
}

// ActivateResult says which checkpoint the VM continued from.
type ActivateResult struct {
	Seq     uint64    `json:"seq"`
	TakenAt time.Time `json:"taken_at"`
	Bytes   int64     `json:"bytes"`
	// Took is from the call to the guest running.
	TookMS float64 `json:"took_ms"`
}

// CheckpointsRequest opens the checkpoint stream of VM on its secondary.
type CheckpointsRequest struct {
	VM string `json:"vm"`
}

// ProtectionStatus is the primary's view of a protection.
type ProtectionStatus struct {
	Secondary  string `json:"secondary"`
	Generation int64  `json:"generation"`
	// State: "syncing" (no checkpoint committed yet in this run),
	// "protected", or "broken" (the stream failed; Error says why, and it
	// is being retried).
	State string `json:"state"`
	Error string `json:"error,omitempty"`
	// Run identifies the QEMU process being checkpointed.
	Run         string    `json:"run,omitempty"`
	Seq         uint64    `json:"seq,omitempty"`
	CommittedAt time.Time `json:"committed_at,omitzero"`
	// Checkpoints counts those committed since the protection started here.
	Checkpoints int64 `json:"checkpoints,omitempty"`
	// Pause percentiles are the guest's stops over recent checkpoints.
	PauseP50MS float64 `json:"pause_p50_ms,omitempty"`
	PauseP99MS float64 `json:"pause_p99_ms,omitempty"`
	// Bytes is the size of the last checkpoint; TookMS how long it took
	// from start to commit.
	Bytes  int64   `json:"bytes,omitempty"`
	TookMS float64 `json:"took_ms,omitempty"`
	// SecondaryHeardAt is when the secondary last answered (the direct
	// heartbeat between the two hosts).
	SecondaryHeardAt time.Time `json:"secondary_heard_at,omitzero"`
}

// EventKind names what happened to a VM on a host.
type EventKind string

const (
	// EventStarted: a QEMU process was started.
	EventStarted EventKind = "started"
	// EventAdopted: a restarted agent reconnected to a QEMU left running.
	EventAdopted EventKind = "adopted"
	// EventExited: the QEMU process is gone. Expected tells whether it was asked to stop.
	EventExited EventKind = "exited"
	// EventGuestReady: the first heartbeat of a new guest boot arrived.
	EventGuestReady EventKind = "guest-ready"
	// EventRunState: QEMU's run state changed (e.g. paused, resumed).
	EventRunState EventKind = "run-state"
	// EventProgress: a long operation (saving or loading state) moved on.
	EventProgress EventKind = "progress"
	// EventIncident: the guest crashed (panic) or hung; Incident says how.
	// An unexpected exit is reported as EventExited with an Incident too.
	EventIncident EventKind = "incident"
	// EventHealth: the health verdict changed (e.g. agent-unwell, healthy).
	EventHealth EventKind = "health"
	// EventFenced: the host killed the VM because it lost every manager
	// (or was declared dead); the VM may run elsewhere now.
	EventFenced EventKind = "fenced"
	// EventDropped: the host let go of a VM that another host now owns.
	EventDropped EventKind = "dropped"
)

// MsgGuestPoweredOff is the message of the EventExited of a guest that
// powered itself off: the one exit the manager turns into a stop.
const MsgGuestPoweredOff = "the guest powered off"

// Event is reported by a host agent as it happens.
type Event struct {
	Time     time.Time `json:"time"`
	Host     string    `json:"host"`
	VM       string    `json:"vm"`
	Kind     EventKind `json:"kind"`
	Expected bool      `json:"expected,omitempty"`
	Message  string    `json:"message,omitempty"`
	// Incident is set for EventIncident and for unexpected EventExited.
	Incident *Incident `json:"incident,omitempty"`
}

// Incident kinds.
const (
	IncidentExit  = "exit"
	IncidentPanic = "panic"
	IncidentHang  = "hang"
	// IncidentHostFailure: the VM's host was declared dead; the VM was
	// restarted on another host.
	IncidentHostFailure = "host-failure"
)

// Incident is a crash or hang as the host saw it, with its evidence.
type Incident struct {
	Kind       string    `json:"kind"`
	DetectedAt time.Time `json:"detected_at"`
	Evidence   Evidence  `json:"evidence"`
}

// Evidence is what the host saw when it judged.
type Evidence struct {
	LastHeartbeat     time.Time `json:"last_heartbeat,omitzero"`
	HeartbeatSilenceS float64   `json:"heartbeat_silence_seconds"`
	ActivitySilenceS  float64   `json:"activity_silence_seconds"`
	CPUTimeMS         int64     `json:"cpu_time_ms"`
	DiskOps           uint64    `json:"disk_ops"`
	RunState          string    `json:"run_state,omitempty"`
	Detail            string    `json:"detail,omitempty"`
	// Console is the last lines of the serial console.
	Console []string `json:"console,omitempty"`
}

// SaveResult describes a finished save of a VM's state (suspend or snapshot).
type SaveResult struct {
	Path     string        `json:"path,omitempty"`
	Bytes    int64         `json:"bytes"`
	Duration time.Duration `json:"duration"`
	// Paused is how long the guest's CPUs were stopped by the operation.
	Paused time.Duration `json:"paused"`
	// Quiesced: a disk snapshot taken with the guest's file systems
	// frozen (for Frozen); Note says how consistent it is and why.
	Quiesced bool          `json:"quiesced,omitempty"`
	Frozen   time.Duration `json:"frozen,omitempty"`
	Note     string        `json:"note,omitempty"`
}

// Migration describes a finished live migration, as QEMU measured it.
type Migration struct {
	Total    time.Duration `json:"total"`
	Downtime time.Duration `json:"downtime"`
	Bytes    int64         `json:"bytes"`
}

// Join is what a host sends to join a cluster the first time
// (POST /v1/hosts/join, over TLS pinned to the CA of the join token): its
// name, the token, a certificate request for the key it made, and where
// the managers reach it.
type Join struct {
	Name  string `json:"name"`
	Token string `json:"token"`
	CSR   string `json:"csr"` // PEM
	Register
}

// Joined answers Join: the host's certificate and the cluster CA.
type Joined struct {
	Cert string `json:"cert"` // PEM
	CA   string `json:"ca"`   // PEM
}

// Register is what a joined host sends when it (re)starts
// (POST /v1/hosts/register, over mutual TLS: its certificate names it).
type Register struct {
	// Addr is where the manager reaches the host agent (host:port).
	Addr string   `json:"addr"`
	Info api.Host `json:"info"`
	// FenceAfterMS is how long the host goes without a manager before it
	// kills its VMs; a manager must wait longer before declaring it dead.
	FenceAfterMS int64 `json:"fence_after_ms"`
}

// Renew asks for a new certificate for a new key, before the current one
// expires (POST /v1/hosts/{name}/certificate, over mutual TLS).
type Renew struct {
	CSR string `json:"csr"` // PEM
}

// Heartbeat is sent by a host agent every second
// (POST /v1/hosts/{name}/heartbeat), with what runs on it: every VM's
// status (a report, numbered), or, when nothing a decision reads changed
// since a report the manager took, that report's number (see report.go).
type Heartbeat struct {
	Info     api.Host   `json:"info"`
	Statuses []VMStatus `json:"statuses"`
	Events   []Event    `json:"events,omitempty"`
	// Report numbers the statuses this heartbeat carries (0: unnumbered).
	Report uint64 `json:"report,omitempty"`
	// Same, instead of statuses, says every VM is as in the report of this
	// number (SameReport), counters and times aside; Guests then carries
	// what moves in each guest's heartbeat, so a VM's view stays live.
	Same   uint64      `json:"same,omitempty"`
	Guests []GuestTick `json:"guests,omitempty"`
}

// GuestTick is what moves with a guest's heartbeats (api.GuestInfo's
// counters), for a heartbeat that says Same.
type GuestTick struct {
	Name          string    `json:"name"`
	Seq           uint64    `json:"seq"`
	UptimeSeconds float64   `json:"uptime_seconds"`
	Load1         float64   `json:"load1,omitempty"`
	MemUsedBytes  uint64    `json:"mem_used_bytes,omitempty"`
	LastHeartbeat time.Time `json:"last_heartbeat"`
}
