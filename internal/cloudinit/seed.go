// Package cloudinit builds the NoCloud seed volume that cloud-init reads
// on a guest's first boot, and checks the user data that goes into it.
//
// cloud-init's NoCloud datasource looks for a filesystem labelled "cidata"
// (blkid TYPE=iso9660 LABEL=cidata) and reads the files "meta-data",
// "user-data" and, when present, "network-config" from its root. Seed
// builds that volume as an ISO 9660 image to attach to the guest as a
// CD-ROM or disk.
package cloudinit

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/vigil-project/vigil/internal/iso9660"
	"sigs.k8s.io/yaml"
)

// VolumeID is the label cloud-init's NoCloud datasource looks for.
const VolumeID = "cidata"

// MaxNetworkConfigSize bounds network-config. Real ones are a few hundred
// bytes; the bound only keeps a mistake (a wrong file) out of the seed.
const MaxNetworkConfigSize = 64 << 10

// Meta is what goes into meta-data.
type Meta struct {
	// InstanceID identifies the instance to cloud-init, which runs its
	// once-per-instance steps again whenever this changes. Required: at
	// most 255 bytes of printable UTF-8.
	InstanceID string
	// Hostname becomes local-hostname: a host name or fully qualified
	// domain name (RFC 1123). Empty leaves the image's own.
	Hostname string
}

// Seed returns a NoCloud seed image holding meta-data built from meta,
// userData (a minimal "#cloud-config" when empty, otherwise checked with
// ValidateUserData) and networkConfig when it is not empty. The image is
// a pure function of the arguments, so it can be cached or compared.
func Seed(meta Meta, userData, networkConfig []byte) ([]byte, error) {
	metaData, err := meta.marshal()
	if err != nil {
		return nil, err
	}
	if len(userData) == 0 {
		userData = []byte("#cloud-config\n")
	} else if err := ValidateUserData(userData); err != nil {
		return nil, err
	}
	files := []iso9660.File{
		{Name: "meta-data", Data: metaData},
		{Name: "user-data", Data: userData},
	}
	if len(networkConfig) > 0 {
		if err := ValidateNetworkConfig(networkConfig); err != nil {
			return nil, err
		}
		files = append(files, iso9660.File{Name: "network-config", Data: networkConfig})
	}
	var buf bytes.Buffer
	if err := iso9660.Write(&buf, VolumeID, files); err != nil {
		return nil, fmt.Errorf("build seed image: %w", err)
	}
	return buf.Bytes(), nil
}

func (m Meta) marshal() ([]byte, error) {
	id := m.InstanceID
	switch {
	case id == "":
		return nil, fmt.Errorf("%w: instance id is required", ErrInvalidMeta)
	case len(id) > 255:
		return nil, fmt.Errorf("%w: instance id is %d bytes, limit 255", ErrInvalidMeta, len(id))
	case !utf8.ValidString(id):
		return nil, fmt.Errorf("%w: instance id %q is not UTF-8", ErrInvalidMeta, id)
	case strings.IndexFunc(id, func(r rune) bool { return !unicode.IsPrint(r) }) >= 0:
		return nil, fmt.Errorf("%w: instance id %q has a non-printable character", ErrInvalidMeta, id)
	}
	var b strings.Builder
	b.WriteString("instance-id: " + yamlString(id) + "\n")
	if m.Hostname != "" {
		if err := checkHostname(m.Hostname); err != nil {
			return nil, err
		}
		b.WriteString("local-hostname: " + yamlString(m.Hostname) + "\n")
	}
	return []byte(b.String()), nil
}

// checkHostname accepts RFC 1123 host names and dotted FQDNs (a trailing
// dot is refused: cloud-init would set it as part of the name).
func checkHostname(h string) error {
	if len(h) > 253 {
		return fmt.Errorf("%w: hostname is %d bytes, limit 253", ErrInvalidMeta, len(h))
	}
	for _, label := range strings.Split(h, ".") {
		ok := label != "" && len(label) <= 63 && label[0] != '-' && label[len(label)-1] != '-'
		for i := 0; ok && i < len(label); i++ {
			c := label[i]
			ok = c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-'
		}
		if !ok {
			return fmt.Errorf("%w: hostname %q: each dot-separated label must be 1 to 63 letters, digits or '-', not starting or ending with '-'", ErrInvalidMeta, h)
		}
	}
	return nil
}

// yamlString quotes s as a YAML double-quoted scalar. JSON strings are
// valid there, and quoting keeps values such as "yes", "1e3" or "null"
// strings instead of letting YAML 1.1 turn them into other types.
func yamlString(s string) string {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(s) // a string always encodes
	return strings.TrimSuffix(b.String(), "\n")
}

// ValidateNetworkConfig checks that b is a YAML mapping in one of the
// shapes cloud-init reads from network-config: a version 1 or 2 document
// at the top ("version: 2"), or one under a "network" key.
func ValidateNetworkConfig(b []byte) error {
	if len(b) > MaxNetworkConfigSize {
		return fmt.Errorf("%w: %d bytes, limit %d", ErrInvalidNetworkConfig, len(b), MaxNetworkConfigSize)
	}
	var doc map[string]any
	if err := yaml.Unmarshal(b, &doc); err != nil {
		return fmt.Errorf("%w: not a YAML mapping: %w", ErrInvalidNetworkConfig, err)
	}
	if n, ok := doc["network"].(map[string]any); ok {
		doc = n
	}
	switch v := doc["version"].(type) {
	case float64:
		if v == 1 || v == 2 {
			return nil
		}
	}
	return fmt.Errorf("%w: want a mapping with \"version: 1\" or \"version: 2\" (at the top or under \"network\")", ErrInvalidNetworkConfig)
}
