package cloudinit

import (
	"crypto/ecdh"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"math/big"
	"strings"
	"unicode"
)

// UserDataForSSHKeys returns a "#cloud-config" document that authorizes
// the keys for the image's default user (cloud-init's top-level
// ssh_authorized_keys). Each key is one OpenSSH public key line, as in
// id_ed25519.pub: a type, the base64 key and an optional comment. The
// types accepted are ssh-ed25519, ssh-rsa (1024 bits or more, OpenSSH's
// own minimum), ecdsa-sha2-nistp256/384/521 and their security-key forms
// sk-ssh-ed25519@openssh.com and sk-ecdsa-sha2-nistp256@openssh.com; the
// base64 must decode to a key of the named type. authorized_keys options
// ("no-pty ssh-ed25519 ...") are refused. Errors wrap ErrInvalidSSHKey.
func UserDataForSSHKeys(keys []string) ([]byte, error) {
	if len(keys) == 0 {
		return nil, fmt.Errorf("%w: no keys given", ErrInvalidSSHKey)
	}
	var b strings.Builder
	b.WriteString("#cloud-config\nssh_authorized_keys:\n")
	for i, k := range keys {
		line, err := parseAuthorizedKey(k)
		if err != nil {
			return nil, fmt.Errorf("%w: key %d: %w", ErrInvalidSSHKey, i+1, err)
		}
		b.WriteString("  - " + yamlString(line) + "\n")
	}
	return []byte(b.String()), nil
}

const acceptedKeyTypes = "ssh-ed25519, ssh-rsa, ecdsa-sha2-nistp256, ecdsa-sha2-nistp384, ecdsa-sha2-nistp521, " +
	"sk-ssh-ed25519@openssh.com or sk-ecdsa-sha2-nistp256@openssh.com"

// parseAuthorizedKey checks one public key line and returns it with its
// white space normalised.
func parseAuthorizedKey(s string) (string, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return "", errors.New("empty")
	}
	if strings.ContainsFunc(s, func(r rune) bool { return unicode.IsControl(r) && r != '\t' }) {
		return "", errors.New("contains a line break or control character: give one key per entry")
	}
	if strings.Contains(s, "PRIVATE KEY") {
		return "", errors.New("this is a private key: give the public key (the .pub file)")
	}
	fields := strings.Fields(s)
	typ := fields[0]
	if !knownKeyType(typ) {
		for _, f := range fields[1:] {
			if knownKeyType(f) {
				return "", fmt.Errorf("starts with %q: authorized_keys options are not supported, give the bare key", short(typ))
			}
		}
		return "", fmt.Errorf("key type %q is not one of %s", short(typ), acceptedKeyTypes)
	}
	var blob, comment string
	if len(fields) > 1 {
		blob, comment = fields[1], strings.Join(fields[2:], " ")
	}
	if blob == "" {
		return "", fmt.Errorf("%s key has no base64 key data", typ)
	}
	raw, err := base64.StdEncoding.DecodeString(blob)
	if err != nil {
		return "", fmt.Errorf("%s key data is not base64: %w", typ, err)
	}
	if err := checkKeyBlob(typ, raw); err != nil {
		return "", fmt.Errorf("%s key data: %w", typ, err)
	}
	line := typ + " " + blob
	if comment != "" {
		line += " " + comment
	}
	return line, nil
}

func knownKeyType(t string) bool {
	switch t {
	case "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
		"sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com":
		return true
	}
	return false
}

func short(s string) string {
	if len(s) > 30 {
		return s[:30] + "..."
	}
	return s
}

// checkKeyBlob checks the decoded key in the SSH wire format (RFC 4253
// 6.6, RFC 5656 3.1, RFC 8709 4, OpenSSH PROTOCOL.u2f): the type string
// again, then the fields of that type and nothing after them.
func checkKeyBlob(typ string, raw []byte) error {
	r := wireReader{b: raw}
	if name := r.string(); r.err != nil || string(name) != typ {
		return fmt.Errorf("does not begin with its type %q", typ)
	}
	switch typ {
	case "ssh-ed25519", "sk-ssh-ed25519@openssh.com":
		if pk := r.string(); r.err == nil && len(pk) != 32 {
			return fmt.Errorf("ed25519 key is %d bytes, want 32", len(pk))
		}
	case "ssh-rsa":
		e, n := r.mpint(), r.mpint()
		if r.err != nil {
			break
		}
		if e.Bit(0) == 0 || e.Cmp(big.NewInt(3)) < 0 {
			return errors.New("RSA exponent is not an odd number of 3 or more")
		}
		if bits := n.BitLen(); bits < 1024 || bits > 16384 {
			return fmt.Errorf("RSA modulus is %d bits, want 1024 to 16384", bits)
		}
	default: // ECDSA
		curveName := strings.TrimSuffix(strings.TrimPrefix(strings.TrimPrefix(typ, "sk-"), "ecdsa-sha2-"), "@openssh.com")
		curve := map[string]ecdh.Curve{"nistp256": ecdh.P256(), "nistp384": ecdh.P384(), "nistp521": ecdh.P521()}[curveName]
		if name := r.string(); r.err == nil && string(name) != curveName {
			return fmt.Errorf("curve %q does not match the type", name)
		}
		// NewPublicKey accepts only an uncompressed point on the curve.
		if q := r.string(); r.err == nil {
			if _, err := curve.NewPublicKey(q); err != nil {
				return fmt.Errorf("ECDSA point: %w", err)
			}
		}
	}
	if strings.HasPrefix(typ, "sk-") {
		r.string() // the FIDO application, usually "ssh:"
	}
	if r.err != nil {
		return r.err
	}
	if len(r.b) != 0 {
		return fmt.Errorf("%d bytes after the key", len(r.b))
	}
	return nil
}

// wireReader reads SSH wire-format fields, keeping the first error so a
// sequence of reads needs one check.
type wireReader struct {
	b   []byte
	err error
}

func (r *wireReader) string() []byte {
	if r.err != nil {
		return nil
	}
	if len(r.b) < 4 {
		r.err = errors.New("truncated")
		return nil
	}
	n := binary.BigEndian.Uint32(r.b)
	if uint64(n) > uint64(len(r.b)-4) {
		r.err = errors.New("truncated")
		return nil
	}
	s := r.b[4 : 4+n]
	r.b = r.b[4+n:]
	return s
}

// mpint reads a non-negative multiple-precision integer (RFC 4251 5).
func (r *wireReader) mpint() *big.Int {
	s := r.string()
	if r.err != nil {
		return nil
	}
	if len(s) > 0 && s[0]&0x80 != 0 {
		r.err = errors.New("negative integer")
		return nil
	}
	return new(big.Int).SetBytes(s)
}
