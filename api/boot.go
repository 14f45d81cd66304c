package api

import "time"

// BootImage is a host image stateless hosts boot from the network.
type BootImage struct {
	Digest        string    `json:"digest"`
	KernelVersion string    `json:"kernel_version"`
	QEMUVersion   string    `json:"qemu_version"`
	CAFingerprint string    `json:"ca_fingerprint"`
	Bytes         int64     `json:"bytes"`
	BuiltAt       time.Time `json:"built_at"`
}

// BootProfile is what a machine admitted with it boots and runs as.
type BootProfile struct {
	Name        string            `json:"name"`
	Image       string            `json:"image"` // a BootImage digest
	StoragePool string            `json:"storage_pool,omitempty"`
	Labels      map[string]string `json:"labels,omitempty"`
	CreatedAt   time.Time         `json:"created_at"`
	UpdatedAt   time.Time         `json:"updated_at"`
}

// Boot machine states.
const (
	// MachineQuarantined: seen booting, not admitted: it gets no
	// configuration and no credentials.
	MachineQuarantined = "quarantined"
	// MachineAdmitted: it gets its profile's configuration at every boot.
	MachineAdmitted = "admitted"
)

// BootMachine is a machine that booted from Vigil's boot service.
type BootMachine struct {
	MAC       string    `json:"mac"`
	UUID      string    `json:"uuid,omitempty"`
	State     string    `json:"state"`
	Profile   string    `json:"profile,omitempty"`
	HostName  string    `json:"host_name,omitempty"`
	IP        string    `json:"ip,omitempty"`
	FirstSeen time.Time `json:"first_seen"`
	LastSeen  time.Time `json:"last_seen"`
	// Boots counts the configurations it was given.
	Boots int `json:"boots"`
	// LastImage and LastConfig are the digests of the host image and the
	// signed configuration of its last boot.
	LastImage    string    `json:"last_image,omitempty"`
	LastConfig   string    `json:"last_config,omitempty"`
	LastConfigAt time.Time `json:"last_config_at,omitempty"`
	// PinnedImage, during a rollout, is the image the machine boots
	// instead of its profile's.
	PinnedImage string `json:"pinned_image,omitempty"`
	// Power is how the manager resets the machine (qmp:SOCKET for a QEMU
	// machine standing in for bare metal); empty: it cannot.
	Power string `json:"power,omitempty"`
	// LastBoot is when the boot service saw each stage of the machine's
	// latest boot.
	LastBoot *BootStages `json:"last_boot,omitempty"`
	// LastTokenID names the join token of its last configuration (revoked
	// when the next is issued or the machine is quarantined).
	LastTokenID string `json:"last_token_id,omitempty"`
	// LastError is what the machine last reported (a refused configuration).
	LastError   string    `json:"last_error,omitempty"`
	LastErrorAt time.Time `json:"last_error_at,omitempty"`
	// Vendor and Product are what the machine's firmware says it is
	// (SMBIOS), as iPXE or the booted host reported them.
	Vendor  string `json:"vendor,omitempty"`
	Product string `json:"product,omitempty"`
	// Rule names the boot rule that admitted it (empty: an operator did).
	Rule string `json:"rule,omitempty"`
	// Held: an operator quarantined it; no rule admits it again until an
	// operator admits it.
	Held bool `json:"held,omitempty"`
}

// BootRule admits machines that boot, as VMware Auto Deploy's deploy
// rules: the first rule (lowest rank) all of whose given matchers match
// a quarantined machine admits it with its profile. What a machine says of
// itself (MAC, UUID, vendor) is a claim anyone on the boot network can
// make: a rule trusts the boot network as much as it admits.
type BootRule struct {
	Name string `json:"name"`
	Rank int    `json:"rank"`
	// MAC is one address, or a prefix ending in * (52:54:00:*).
	MAC  string `json:"mac,omitempty"`
	UUID string `json:"uuid,omitempty"`
	// Vendor is the SMBIOS manufacturer, compared without case.
	Vendor  string `json:"vendor,omitempty"`
	Profile string `json:"profile"`
	// HostName names the one machine a MAC or UUID rule matches; without
	// it, hosts are named HostPrefix (default: the profile) and the MAC's
	// last three bytes, as rack-a-be-ee-01.
	HostName   string    `json:"host_name,omitempty"`
	HostPrefix string    `json:"host_prefix,omitempty"`
	CreatedAt  time.Time `json:"created_at"`
}

// BootAdmitRequest admits a quarantined machine.
type BootAdmitRequest struct {
	Profile  string `json:"profile"`
	HostName string `json:"host_name"`
}

// BootStages are the moments of one network boot the boot service sees.
type BootStages struct {
	// DHCP: iPXE's first request (the NIC's firmware is running).
	DHCP time.Time `json:"dhcp"`
	// Script: iPXE fetched its script.
	Script time.Time `json:"script,omitempty"`
	// Loaded: the whole initramfs was sent (the kernel before it).
	Loaded time.Time `json:"loaded,omitempty"`
	// HostUp: the booted system's own DHCP request (kernel and init ran).
	HostUp time.Time `json:"host_up,omitempty"`
	// Configured: the signed configuration was sent.
	Configured time.Time `json:"configured,omitempty"`
}

// BootPowerRequest says how to power-cycle a machine.
type BootPowerRequest struct {
	// Power is qmp:SOCKET (a QEMU machine's monitor on the manager's
	// machine); IPMI and Redfish are not supported yet.
	Power string `json:"power"`
}

// BootRolloutRequest moves a profile's hosts to another image.
type BootRolloutRequest struct {
	Image string `json:"image"`
	// TimeoutSeconds is how long a rebooted host may take to be back and
	// healthy before the rollout rolls it back and stops (default 600).
	TimeoutSeconds int `json:"timeout_seconds,omitempty"`
}

// Rollout states.
const (
	RolloutRunning    = "running"
	RolloutSucceeded  = "succeeded"
	RolloutRolledBack = "rolled-back"
)

// BootRollout moves the hosts of a profile to a new image one at a time:
// drain, reboot with the new image, wait until back and healthy, enable.
type BootRollout struct {
	Profile  string            `json:"profile"`
	From     string            `json:"from"`
	To       string            `json:"to"`
	State    string            `json:"state"`
	Timeout  int               `json:"timeout_seconds"`
	Hosts    []BootRolloutHost `json:"hosts"`
	Started  time.Time         `json:"started"`
	Finished time.Time         `json:"finished,omitempty"`
	Message  string            `json:"message,omitempty"`
}

// BootRolloutHost is one host's part in a rollout.
type BootRolloutHost struct {
	Host     string    `json:"host"`
	MAC      string    `json:"mac"`
	State    string    `json:"state"` // pending, draining, rebooting, done, rolled-back
	Started  time.Time `json:"started,omitempty"`
	Finished time.Time `json:"finished,omitempty"`
	Error    string    `json:"error,omitempty"`
}
