package cloudinit

import "errors"

// Errors returned (wrapped) by this package, for errors.Is. All of them
// describe bad input, never a failure of the package itself.
var (
	// ErrInvalidMeta reports an instance id or hostname that cannot go
	// into meta-data.
	ErrInvalidMeta = errors.New("invalid cloud-init meta-data")
	// ErrInvalidUserData reports user data that cloud-init would ignore
	// or fail on, or that is larger than MaxUserDataSize.
	ErrInvalidUserData = errors.New("invalid cloud-init user data")
	// ErrInvalidNetworkConfig reports a network-config that is not a
	// version 1 or 2 network configuration document.
	ErrInvalidNetworkConfig = errors.New("invalid cloud-init network config")
	// ErrInvalidSSHKey reports a string that is not an OpenSSH public key
	// of a supported type.
	ErrInvalidSSHKey = errors.New("invalid SSH public key")
)
