package bootconfig

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/vigil-project/vigil/internal/pki"
)

func testConfig(now time.Time) Config {
	return Config{MAC: "52:54:00:12:34:56", UUID: "2b7c5f4e-0000-4000-8000-000000000001", HostName: "h3",
		Managers: []string{"https://10.77.0.1:7070"}, JoinToken: "vjt1.x", Image: "sha256:" + strings.Repeat("a", 64),
		Profile: "default", Nonce: "n1", IssuedAt: now, Expires: now.Add(10 * time.Minute)}
}

func TestSignVerify(t *testing.T) {
	ca, _, err := pki.NewCA("test")
	if err != nil {
		t.Fatal(err)
	}
	other, _, _ := pki.NewCA("other")
	now := time.Now()
	s, err := Sign(ca, testConfig(now))
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := json.Marshal(s)
	c, got, err := Verify(raw, ca.Cert, "52:54:00:12:34:56", "n1")
	if err != nil {
		t.Fatal(err)
	}
	if c.HostName != "h3" || got.Digest() != s.Digest() {
		t.Fatalf("verified %+v", c)
	}
	tamper := func(f func(*Signed)) []byte {
		s2 := Signed{Config: append([]byte(nil), s.Config...), Signature: append([]byte(nil), s.Signature...)}
		f(&s2)
		b, _ := json.Marshal(s2)
		return b
	}
	for _, tc := range []struct {
		name string
		raw  []byte
		ca   *pki.CA
		mac  string
		at   string
		want string
	}{
		{"host name changed", tamper(func(s *Signed) { s.Config = []byte(strings.Replace(string(s.Config), `"h3"`, `"h4"`, 1)) }), ca, "52:54:00:12:34:56", "n1", "does not verify"},
		{"signature flipped", tamper(func(s *Signed) { s.Signature[10] ^= 1 }), ca, "52:54:00:12:34:56", "n1", "does not verify"},
		{"another cluster's ca", raw, other, "52:54:00:12:34:56", "n1", "does not verify"},
		{"another machine", raw, ca, "52:54:00:99:99:99", "n1", "for machine"},
		{"another request's answer", raw, ca, "52:54:00:12:34:56", "n2", "does not answer this request"},
		{"no nonce", raw, ca, "52:54:00:12:34:56", "", "does not answer this request"},
		{"not json", []byte("{"), ca, "52:54:00:12:34:56", "n1", "not a signed configuration"},
		{"too big", make([]byte, MaxSize+1), ca, "52:54:00:12:34:56", "n1", "more than"},
	} {
		_, _, err := Verify(tc.raw, tc.ca.Cert, tc.mac, tc.at)
		if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want a refusal saying %q", tc.name, err, tc.want)
		}
	}
}

func TestSignRefusesBadConfigs(t *testing.T) {
	ca, _, _ := pki.NewCA("test")
	now := time.Now()
	for name, f := range map[string]func(*Config){
		"bad mac":         func(c *Config) { c.MAC = "nope" },
		"bad host name":   func(c *Config) { c.HostName = "H 3" },
		"no managers":     func(c *Config) { c.Managers = nil },
		"plain http":      func(c *Config) { c.Managers = []string{"http://10.0.0.1:7070"} },
		"no token":        func(c *Config) { c.JoinToken = "" },
		"already expired": func(c *Config) { c.Expires = c.IssuedAt },
	} {
		c := testConfig(now)
		f(&c)
		if _, err := Sign(ca, c); err == nil {
			t.Errorf("%s: signed", name)
		}
	}
}

func FuzzVerify(f *testing.F) {
	ca, _, _ := pki.NewCA("fuzz")
	now := time.Now()
	s, _ := Sign(ca, testConfig(now))
	raw, _ := json.Marshal(s)
	f.Add(raw)
	f.Add([]byte(`{"config":"e30=","signature":"AA=="}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		c, _, err := Verify(b, ca.Cert, "52:54:00:12:34:56", "n1")
		if err == nil && c.HostName == "" {
			t.Fatalf("accepted a configuration with no host name: %q", b)
		}
	})
}
