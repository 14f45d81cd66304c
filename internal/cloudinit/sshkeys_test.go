package cloudinit

import (
	"crypto/ed25519"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

// Public keys made by OpenSSH's ssh-keygen, so the parser is checked
// against the real format and not only against itself.
const (
	keyEd25519  = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICHYGKCzvfRjTKNiPQ7AIoJY7Rno6CRq5AdXCr7Tr/Ak test@ed25519"
	keyRSA      = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQDq7mTAUZuthyybBUFzCmWGT20hhnQtlMdZyvR6R2w14sjN3x9gSmgJKr5uNqT1n1nYJSDywANFH3sUT1KtBqDcj3FdxfaYx2voVSKaPLHScKwgwU6eD+VGyVHXxWTBcFsiijb2iI5izBHmat4ZwIpvkU5WGgTU+q78pC32Prf9YgNoz4bh1W0DirfpSphj/Ce75Qy/aXRLIEi1L9e6BvPr7zskT6uVSOc3FOgaX8DZdf+AcnG6Vvtm/pMcXljsgEKMXQqoitgGnhpfbQ5Pp4luH+XyQs09T09U3rtLFrz031eAmfYatHJP7GtgIrsN38zdtC5vxmM+bubyzDXvdsVz test@rsab2048"
	keyECDSA256 = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBLsro/nlYtB47+rADPqlnwhtu79dRFTHSFxOwlzI7/x6cDrM3KOTtncaKq4zdp1m9CJBeXwLiKqpRRbH1+qn0YE= test@ecdsab256"
	keyECDSA384 = "ecdsa-sha2-nistp384 AAAAE2VjZHNhLXNoYTItbmlzdHAzODQAAAAIbmlzdHAzODQAAABhBAtoTJ/602IkqTMZleezLli5wUqREFFyCyI9oRr1KjBdlmyfOr9n+pi8TZOzLFOYnICXG4EvxUwJ940eg9tTO3an0e7jkbwajjEtzNbfF6cmJ3prtvw3avQAZLNGJ1sHVA== test@ecdsab384"
	keyECDSA521 = "ecdsa-sha2-nistp521 AAAAE2VjZHNhLXNoYTItbmlzdHA1MjEAAAAIbmlzdHA1MjEAAACFBAH0ZU/jGH5cokyv73OVWXr5HWE8vuGzt/8O5xpM/VWB8EpzljfKafjdFncf87PROMrU1PmQReE+l2mI3R8hW+EfuwAoSOL1lfHRGrXPFKLvhzYA21vFdtuw/4XlEpZwne+zjUEAHQkP5CkFDTXugF8VZp0CRZN5mFxg6CuNrb6Jgf5Haw== test@ecdsab521"
)

// wire joins fields as SSH wire-format strings.
func wire(fields ...[]byte) []byte {
	var b []byte
	for _, f := range fields {
		b = binary.BigEndian.AppendUint32(b, uint32(len(f)))
		b = append(b, f...)
	}
	return b
}

func keyLine(typ string, blob []byte) string {
	return typ + " " + base64.StdEncoding.EncodeToString(blob)
}

func blobOf(t *testing.T, key string) []byte {
	t.Helper()
	b, err := base64.StdEncoding.DecodeString(strings.Fields(key)[1])
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestParseAuthorizedKeyAccepts(t *testing.T) {
	pub := ed25519.NewKeyFromSeed(make([]byte, ed25519.SeedSize)).Public().(ed25519.PublicKey)
	skEd25519 := keyLine("sk-ssh-ed25519@openssh.com", wire([]byte("sk-ssh-ed25519@openssh.com"), pub, []byte("ssh:"))) + " yubikey"
	// The nistp256 point from the real key, wrapped as a security key.
	ecBlob := blobOf(t, keyECDSA256)
	skECDSA := keyLine("sk-ecdsa-sha2-nistp256@openssh.com",
		append(wire([]byte("sk-ecdsa-sha2-nistp256@openssh.com")), append(ecBlob[len(wire([]byte("ecdsa-sha2-nistp256"))):], wire([]byte("ssh:"))...)...))

	tests := []struct {
		name, in, want string
	}{
		{"ed25519", keyEd25519, keyEd25519},
		{"rsa", keyRSA, keyRSA},
		{"ecdsa p256", keyECDSA256, keyECDSA256},
		{"ecdsa p384", keyECDSA384, keyECDSA384},
		{"ecdsa p521", keyECDSA521, keyECDSA521},
		{"sk ed25519", skEd25519, skEd25519},
		{"sk ecdsa", skECDSA, skECDSA},
		{"no comment", strings.Join(strings.Fields(keyEd25519)[:2], " "), strings.Join(strings.Fields(keyEd25519)[:2], " ")},
		{"white space normalised", "  " + strings.ReplaceAll(keyEd25519, " ", " \t ") + " more  words \n",
			keyEd25519 + " more words"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseAuthorizedKey(tt.in)
			if err != nil {
				t.Fatalf("refused: %v", err)
			}
			if got != tt.want {
				t.Fatalf("got %q, want %q", got, tt.want)
			}
		})
	}
}

func TestParseAuthorizedKeyRefuses(t *testing.T) {
	ed := blobOf(t, keyEd25519)
	ec := blobOf(t, keyECDSA256)
	small := make([]byte, 64)
	small[0] = 0x7f
	tests := []struct {
		name, in, want string
	}{
		{"empty", "  ", "empty"},
		{"two keys", keyEd25519 + "\n" + keyRSA, "one key per entry"},
		{"private key", "-----BEGIN OPENSSH PRIVATE KEY-----", "private key"},
		{"dsa", "ssh-dss AAAAB3NzaC1kc3MAAACBAP== x", "is not one of"},
		{"options", "no-pty " + keyEd25519, "options are not supported"},
		{"command option", `command="echo hi" ` + keyEd25519, "options are not supported"},
		{"no key data", "ssh-ed25519", "no base64"},
		{"bad base64", "ssh-ed25519 AAAA!!!!", "not base64"},
		{"type mismatch", keyLine("ssh-rsa", ed), "does not begin with its type"},
		{"truncated", keyLine("ssh-ed25519", ed[:20]), "truncated"},
		{"trailing bytes", keyLine("ssh-ed25519", append(ed, 0)), "after the key"},
		{"short ed25519", keyLine("ssh-ed25519", wire([]byte("ssh-ed25519"), make([]byte, 31))), "want 32"},
		{"curve mismatch", keyLine("ecdsa-sha2-nistp384", append(wire([]byte("ecdsa-sha2-nistp384")), ec[len(wire([]byte("ecdsa-sha2-nistp256"))):]...)), "does not match"},
		{"point off the curve", keyLine("ecdsa-sha2-nistp256", wire([]byte("ecdsa-sha2-nistp256"), []byte("nistp256"), append([]byte{4}, make([]byte, 64)...))), "ECDSA point"},
		{"small rsa", keyLine("ssh-rsa", wire([]byte("ssh-rsa"), []byte{1, 0, 1}, small)), "RSA modulus is 511 bits"},
		{"even rsa exponent", keyLine("ssh-rsa", wire([]byte("ssh-rsa"), []byte{2}, append([]byte{0}, make([]byte, 256)...))), "exponent"},
		{"negative rsa modulus", keyLine("ssh-rsa", wire([]byte("ssh-rsa"), []byte{1, 0, 1}, []byte{0x80, 1})), "negative"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := parseAuthorizedKey(tt.in)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("got %v, want an error containing %q", err, tt.want)
			}
		})
	}
}

func TestUserDataForSSHKeys(t *testing.T) {
	commented := strings.Join(strings.Fields(keyEd25519)[:2], " ") + ` "quoted" & <tag> ünï: yes`
	keys := []string{keyEd25519, keyRSA, commented}
	got, err := UserDataForSSHKeys(keys)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(string(got), "#cloud-config\n") {
		t.Fatalf("does not start with #cloud-config:\n%s", got)
	}
	if err := ValidateUserData(got); err != nil {
		t.Fatalf("own output refused: %v", err)
	}
	var doc struct {
		Keys []string `json:"ssh_authorized_keys"`
	}
	if err := yaml.UnmarshalStrict(got, &doc); err != nil {
		t.Fatalf("parse:\n%s\n%v", got, err)
	}
	if strings.Join(doc.Keys, "\n") != strings.Join(keys, "\n") {
		t.Fatalf("keys read back %q, want %q", doc.Keys, keys)
	}
}

func TestUserDataForSSHKeysRefuses(t *testing.T) {
	tests := []struct {
		name string
		keys []string
		want string
	}{
		{"none", nil, "no keys"},
		{"second bad", []string{keyEd25519, "ssh-rsa AAAA"}, "key 2"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := UserDataForSSHKeys(tt.keys)
			if !errors.Is(err, ErrInvalidSSHKey) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("got %v, want ErrInvalidSSHKey mentioning %q", err, tt.want)
			}
		})
	}
}
