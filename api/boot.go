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
	// LastBoot is when the boot service saw each stage of the machine's
	// latest boot.
	LastBoot *BootStages `json:"last_boot,omitempty"`
	// LastError is what the machine last reported (a refused configuration).
	LastError   string    `json:"last_error,omitempty"`
	LastErrorAt time.Time `json:"last_error_at,omitempty"`
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
