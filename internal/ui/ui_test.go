package ui

import (
	"bytes"
	"compress/gzip"
	"io"
	"net/http"
	"net/http/httptest"
	"path"
	"regexp"
	"strings"
	"testing"
)

func serve(t *testing.T, h *Handler, method, target string, hdr map[string]string) *httptest.ResponseRecorder {
	t.Helper()
	r := httptest.NewRequest(method, target, nil)
	for k, v := range hdr {
		r.Header.Set(k, v)
	}
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	return w
}

func TestServesTheFiles(t *testing.T) {
	h, err := New()
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		target string
		hdr    map[string]string
		code   int
		ctype  string
		gzip   bool
	}{
		{"/ui/", nil, 200, "text/html; charset=utf-8", false},
		{"/ui/app.js", nil, 200, "text/javascript; charset=utf-8", false},
		{"/ui/style.css", map[string]string{"Accept-Encoding": "gzip, br"}, 200, "text/css; charset=utf-8", true},
		{"/ui/vendor/novnc.js", map[string]string{"Accept-Encoding": "gzip"}, 200, "text/javascript; charset=utf-8", true},
		{"/ui/vendor/novnc.js", map[string]string{"Accept-Encoding": "gzip;q=0"}, 200, "text/javascript; charset=utf-8", false},
		{"/ui/nope.js", nil, 404, "", false},
		{"/ui/../ui.go", nil, 404, "", false},
	}
	for _, tc := range tests {
		w := serve(t, h, "GET", tc.target, tc.hdr)
		if w.Code != tc.code {
			t.Errorf("%s: %d, want %d", tc.target, w.Code, tc.code)
			continue
		}
		if w.Header().Get("Content-Security-Policy") != CSP || w.Header().Get("X-Content-Type-Options") != "nosniff" {
			t.Errorf("%s: security headers missing: %v", tc.target, w.Header())
		}
		if tc.code != 200 {
			continue
		}
		if got := w.Header().Get("Content-Type"); got != tc.ctype {
			t.Errorf("%s: content type %q, want %q", tc.target, got, tc.ctype)
		}
		body := w.Body.Bytes()
		if gz := w.Header().Get("Content-Encoding") == "gzip"; gz != tc.gzip {
			t.Errorf("%s: gzip %v, want %v", tc.target, gz, tc.gzip)
		} else if gz {
			zr, err := gzip.NewReader(bytes.NewReader(body))
			if err != nil {
				t.Fatal(err)
			}
			if body, err = io.ReadAll(zr); err != nil {
				t.Fatal(err)
			}
		}
		name := strings.TrimPrefix(tc.target, Prefix)
		if name == "" {
			name = "index.html"
		}
		if !bytes.Equal(body, h.assets[name].body) {
			t.Errorf("%s: body differs from the embedded file", tc.target)
		}
	}
	// Unchanged: 304 on its ETag; writes are refused.
	etag := serve(t, h, "GET", "/ui/app.js", nil).Header().Get("ETag")
	if w := serve(t, h, "GET", "/ui/app.js", map[string]string{"If-None-Match": etag}); w.Code != http.StatusNotModified || w.Body.Len() != 0 {
		t.Errorf("If-None-Match %s: %d", etag, w.Code)
	}
	if w := serve(t, h, "POST", "/ui/app.js", nil); w.Code != http.StatusMethodNotAllowed {
		t.Errorf("POST: %d", w.Code)
	}
}

var (
	importRe = regexp.MustCompile(`(?:from\s+|import\s*\(\s*)'(\.{1,2}/[^']+)'`)
	srcRe    = regexp.MustCompile(`(?:src|href)="([^":#]+)"`)
)

// TestEveryImportIsEmbedded follows the page's module graph from
// index.html: a missing file would only show in a browser.
func TestEveryImportIsEmbedded(t *testing.T) {
	h, err := New()
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	var visit func(name string)
	visit = func(name string) {
		if seen[name] {
			return
		}
		seen[name] = true
		a, ok := h.assets[name]
		if !ok {
			t.Errorf("%s is referenced but not embedded", name)
			return
		}
		if strings.HasPrefix(name, "vendor/") {
			return // bundled: no relative imports
		}
		var refs [][]string
		switch path.Ext(name) {
		case ".html":
			refs = srcRe.FindAllStringSubmatch(string(a.body), -1)
		case ".js":
			refs = importRe.FindAllStringSubmatch(string(a.body), -1)
		}
		for _, r := range refs {
			visit(path.Join(path.Dir(name), r[1]))
		}
	}
	visit("index.html")
	for _, want := range []string{"app.js", "style.css", "views/vm.js", "lib/tree.js", "vendor/novnc.js"} {
		if !seen[want] {
			t.Errorf("%s is not reached from index.html", want)
		}
	}
	for name := range h.assets {
		if !seen[name] && path.Ext(name) == ".js" {
			t.Errorf("%s is embedded but nothing imports it", name)
		}
	}
}

// TestNothingInlineForTheCSP: the CSP forbids inline scripts, styles and
// handlers; the page must not need them.
func TestNothingInlineForTheCSP(t *testing.T) {
	h, err := New()
	if err != nil {
		t.Fatal(err)
	}
	html := string(h.assets["index.html"].body)
	for _, bad := range []*regexp.Regexp{
		regexp.MustCompile(`<script(?:\s[^>]*)?>\s*[^<\s]`), // a script with a body
		regexp.MustCompile(`<style`),
		regexp.MustCompile(`\sstyle="`),
		regexp.MustCompile(`\son[a-z]+="`),
	} {
		if m := bad.FindString(html); m != "" {
			t.Errorf("index.html has %q, which the CSP blocks", m)
		}
	}
	for name, a := range h.assets {
		if path.Ext(name) == ".js" && !strings.HasPrefix(name, "vendor/") {
			for _, bad := range []string{"innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "setAttribute('style'", "eval(", "new Function", "setTimeout('", "setTimeout(\""} {
				if strings.Contains(string(a.body), bad) {
					t.Errorf("%s uses %s: build markup with h() and text with textContent", name, bad)
				}
			}
		}
	}
}
