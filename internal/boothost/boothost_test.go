package boothost

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vigil-project/vigil/internal/bootconfig"
	"github.com/vigil-project/vigil/internal/pki"
)

func TestParseCmdline(t *testing.T) {
	p, err := ParseCmdline("console=ttyS0 vigil.boot=https://10.77.0.1:8068 vigil.bootmac=52:54:00:BE:EE:01 vigil.image=sha256:ab\n")
	if err != nil || p.ConfigURL != "https://10.77.0.1:8068" || p.MAC != "52:54:00:be:ee:01" || p.Image != "sha256:ab" {
		t.Fatalf("%+v %v", p, err)
	}
	p, _ = ParseCmdline("vigil.boot=https://10.77.0.1:8068 vigil.bootmac=52:54:00:be:ee:01 vigil.kernel=http://10.77.0.1:8067/images/ab/vmlinuz")
	if p.KernelURL != "http://10.77.0.1:8067/images/ab/vmlinuz" {
		t.Fatalf("kernel url: %+v", p)
	}
	if p, _ := ParseCmdline("vigil.boot=https://10.77.0.1:8068 vigil.bootmac=52:54:00:be:ee:01 vigil.kernel=file:///etc/passwd"); p.KernelURL != "" {
		t.Fatalf("a kernel url that is not http: %+v", p)
	}
	for _, bad := range []string{"", "vigil.boot=http://10.0.0.1 vigil.bootmac=52:54:00:be:ee:01", "vigil.boot=https://10.0.0.1", "vigil.boot=https:// vigil.bootmac=52:54:00:be:ee:01"} {
		if _, err := ParseCmdline(bad); err == nil {
			t.Errorf("%q: accepted", bad)
		}
	}
}

// bootServer is a boot service's TLS side with a manager certificate of
// ca, answering with answer.
func bootServer(t *testing.T, ca *pki.CA, answer func(w http.ResponseWriter, req Request)) (*httptest.Server, *[]Request) {
	t.Helper()
	cert, key, err := ca.Issue(pki.Profile{Role: pki.RoleManager, Name: "m1", TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	h := &pki.Holder{}
	if err := h.Set(cert, key, ca.CertPEM); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var reports []Request
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var req Request
		b, _ := io.ReadAll(r.Body)
		json.Unmarshal(b, &req)
		if r.URL.Path == ReportPath {
			mu.Lock()
			reports = append(reports, req)
			mu.Unlock()
			w.WriteHeader(http.StatusNoContent)
			return
		}
		answer(w, req)
	}))
	srv.TLS = pki.ServerConfig(h, nil, false)
	// httptest puts in its own certificate unless one is there, and a
	// client dialling an address sends no name to pick another by.
	kp, err := pki.KeyPair(append(append([]byte(nil), cert...), ca.CertPEM...), key)
	if err != nil {
		t.Fatal(err)
	}
	srv.TLS.Certificates = []tls.Certificate{kp}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	return srv, &reports
}

func testConfig(now time.Time) bootconfig.Config {
	return bootconfig.Config{MAC: "52:54:00:be:ee:01", HostName: "h3", Managers: []string{"https://10.77.0.1:7070"},
		JoinToken: "vj1.x", Profile: "default", IssuedAt: now, Expires: now.Add(10 * time.Minute)}
}

func TestFetch(t *testing.T) {
	ca, _, _ := pki.NewCA("test")
	now := time.Now()
	sign := func(nonce string) bootconfig.Signed {
		c := testConfig(now)
		c.Nonce = nonce
		s, err := bootconfig.Sign(ca, c)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	var good bootconfig.Signed
	// Quarantined twice, then a tampered answer, then the real one.
	var n int
	var mu sync.Mutex
	srv, reports := bootServer(t, ca, func(w http.ResponseWriter, req Request) {
		mu.Lock()
		n++
		i := n
		mu.Unlock()
		switch {
		case i <= 2:
			w.WriteHeader(http.StatusForbidden)
			io.WriteString(w, `{"error":"machine 52:54:00:be:ee:01 is quarantined"}`)
		case i == 3:
			tampered := sign(req.Nonce)
			tampered.Config = []byte(strings.Replace(string(tampered.Config), `"h3"`, `"h4"`, 1))
			json.NewEncoder(w).Encode(tampered)
		case i == 4:
			json.NewEncoder(w).Encode(sign("an old request's nonce")) // a replay
		default:
			g := sign(req.Nonce)
			mu.Lock()
			good = g
			mu.Unlock()
			json.NewEncoder(w).Encode(g)
		}
	})
	p := Params{ConfigURL: srv.URL, MAC: "52:54:00:be:ee:01", Image: "sha256:ab"}
	c := NewClient(p, ca.Cert, slog.New(slog.DiscardHandler))
	c.Retry = 10 * time.Millisecond
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cfg, signed, err := c.Fetch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if cfg.HostName != "h3" || signed.Digest() != good.Digest() || n != 5 {
		t.Fatalf("got %+v after %d requests", cfg, n)
	}
	if len(*reports) != 2 || !strings.Contains((*reports)[0].Error, "does not verify") || !strings.Contains((*reports)[1].Error, "does not answer this request") || (*reports)[0].MAC != p.MAC {
		t.Fatalf("reports %+v", *reports)
	}
}

// A server certified by another CA is not asked at all: the answer could be
// anything.
func TestFetchTrustsOnlyItsCluster(t *testing.T) {
	ca, _, _ := pki.NewCA("test")
	other, _, _ := pki.NewCA("other")
	asked := false
	srv, _ := bootServer(t, other, func(w http.ResponseWriter, req Request) { asked = true })
	c := NewClient(Params{ConfigURL: srv.URL, MAC: "52:54:00:be:ee:01"}, ca.Cert, slog.New(slog.DiscardHandler))
	_, _, err := c.fetchOnce(context.Background())
	if !errors.Is(err, pki.ErrNotPinned) || asked {
		t.Fatalf("another cluster's boot service: err %v, asked %v", err, asked)
	}
}

func FuzzParseCmdline(f *testing.F) {
	f.Add("console=ttyS0 vigil.boot=https://10.77.0.1:8068 vigil.bootmac=52:54:00:be:ee:01 vigil.image=sha256:ab")
	f.Add("vigil.boot= vigil.bootmac")
	f.Fuzz(func(t *testing.T, s string) {
		p, err := ParseCmdline(s)
		if err == nil && (!strings.HasPrefix(p.ConfigURL, "https://") || p.MAC == "") {
			t.Fatalf("accepted %q as %+v", s, p)
		}
	})
}

func TestFetchFileChecksTheSum(t *testing.T) {
	content := []byte("the kernel")
	sum := sha256.Sum256(content)
	good := hex.EncodeToString(sum[:])
	hits := 0
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits++
		switch r.URL.Path {
		case "/flaky":
			if hits == 1 {
				http.Error(w, "busy", http.StatusServiceUnavailable)
				return
			}
		case "/missing":
			http.NotFound(w, r)
			return
		}
		w.Write(content)
	}))
	defer srv.Close()
	dir := t.TempDir()
	ctx := context.Background()
	dst := filepath.Join(dir, "guest", "vmlinuz")
	if err := FetchFile(ctx, srv.Client(), srv.URL+"/flaky", good+"\n", dst); err != nil {
		t.Fatalf("asking again: %v", err)
	}
	if b, _ := os.ReadFile(dst); !bytes.Equal(b, content) {
		t.Fatalf("fetched %q", b)
	}
	other := filepath.Join(dir, "other")
	if err := FetchFile(ctx, srv.Client(), srv.URL+"/ok", strings.Repeat("0", 64), other); err == nil || !strings.Contains(err.Error(), "not used") {
		t.Fatalf("a file with another sum: %v", err)
	}
	if err := FetchFile(ctx, srv.Client(), srv.URL+"/missing", good, other); err == nil {
		t.Fatal("a missing file was fetched")
	}
	if _, err := os.Stat(other); !os.IsNotExist(err) {
		t.Fatalf("a refused file was left: %v", err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Fatalf("temporary files left: %v", ents)
	}
}
