package pki

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"strings"
)

// JoinToken admits a host to a cluster: an id (to find it in the store), a
// secret (stored hashed), and the fingerprint of the cluster CA, so the
// host can check it talks to the right cluster before it sends anything.
// Written vj1.ID.SECRET.FINGERPRINT.
type JoinToken struct {
	ID            string // 16 hex digits
	Secret        string // 32 hex digits
	CAFingerprint string // 64 hex digits
}

const joinPrefix = "vj1"

// NewJoinToken makes a token for the cluster whose CA has fingerprint.
func NewJoinToken(fingerprint string) JoinToken {
	return JoinToken{ID: randomHex(8), Secret: randomHex(16), CAFingerprint: fingerprint}
}

func (t JoinToken) String() string {
	return strings.Join([]string{joinPrefix, t.ID, t.Secret, t.CAFingerprint}, ".")
}

// ParseJoinToken reads a token; what a mistyped or truncated one lacks is
// said in the error.
func ParseJoinToken(s string) (JoinToken, error) {
	parts := strings.Split(strings.TrimSpace(s), ".")
	if len(parts) != 4 || parts[0] != joinPrefix {
		return JoinToken{}, fmt.Errorf("%w: a join token has the form vj1.ID.SECRET.FINGERPRINT: make one with 'vigil host join-token'", ErrInvalid)
	}
	t := JoinToken{ID: parts[1], Secret: parts[2], CAFingerprint: parts[3]}
	for _, f := range []struct {
		what, v string
		n       int
	}{{"id", t.ID, 16}, {"secret", t.Secret, 32}, {"ca fingerprint", t.CAFingerprint, 64}} {
		if len(f.v) != f.n || !isHex(f.v) {
			return JoinToken{}, fmt.Errorf("%w: the join token's %s must be %d hex digits (it may have been cut when copied)", ErrInvalid, f.what, f.n)
		}
	}
	return t, nil
}

// APIToken is a bearer token for the API: an id (the token's name is kept
// with it in the store) and a secret (stored hashed). Written vt1.ID.SECRET.
type APIToken struct {
	ID     string // 16 hex digits
	Secret string // 64 hex digits
}

const apiPrefix = "vt1"

// NewAPIToken makes a fresh token.
func NewAPIToken() APIToken { return APIToken{ID: randomHex(8), Secret: randomHex(32)} }

func (t APIToken) String() string { return strings.Join([]string{apiPrefix, t.ID, t.Secret}, ".") }

// ParseAPIToken reads a bearer token.
func ParseAPIToken(s string) (APIToken, error) {
	parts := strings.Split(strings.TrimSpace(s), ".")
	if len(parts) != 3 || parts[0] != apiPrefix || len(parts[1]) != 16 || len(parts[2]) != 64 || !isHex(parts[1]) || !isHex(parts[2]) {
		return APIToken{}, fmt.Errorf("%w: not a vigil api token (vt1.ID.SECRET)", ErrInvalid)
	}
	return APIToken{ID: parts[1], Secret: parts[2]}, nil
}

func isHex(s string) bool {
	for _, c := range s {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}
