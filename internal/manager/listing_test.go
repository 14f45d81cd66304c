package manager

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/hostproto"
)

// TestListPages lists VMs through the API page by page, with and without
// filters: every VM once, in name order, pages no larger than asked, the
// continue token only while more follow; bad queries say what to do.
func TestListPages(t *testing.T) {
	m, h := newTestManager(t)
	ctx := context.Background()
	for i := 0; i < 12; i++ {
		if _, err := m.Create(ctx, api.VMCreateRequest{Name: fmt.Sprintf("vm%02d", i), MemoryBytes: 64 << 20, CPUs: 1, DiskBytes: 64 << 20, Start: i%3 == 0}); err != nil {
			t.Fatal(err)
		}
	}
	viewer := token(t, m, "watch", RoleViewer, 0)
	get := func(query string) ([]api.VM, string, int, string) {
		req := httptest.NewRequest("GET", "/v1/vms"+query, nil)
		req.Header.Set("Authorization", "Bearer "+viewer)
		w := httptest.NewRecorder()
		m.Handler().ServeHTTP(w, req)
		var vms []api.VM
		json.Unmarshal(w.Body.Bytes(), &vms)
		return vms, w.Header().Get(continueHeader), w.Code, w.Body.String()
	}
	all := func(query string, limit int) []string {
		var names []string
		cont := ""
		for pages := 0; ; pages++ {
			q := query
			if cont != "" {
				q += "&continue=" + cont
			}
			vms, next, code, body := get(q)
			if code != http.StatusOK {
				t.Fatalf("%s: %d %s", q, code, body)
			}
			if len(vms) > limit || pages > 20 {
				t.Fatalf("%s: a page of %d (limit %d), page %d", q, len(vms), limit, pages)
			}
			for _, vm := range vms {
				names = append(names, vm.Name)
			}
			if next == "" {
				return names
			}
			cont = next
		}
	}
	cases := []struct {
		query string
		limit int
		want  string
	}{
		{"?limit=5", 5, "vm00,vm01,vm02,vm03,vm04,vm05,vm06,vm07,vm08,vm09,vm10,vm11"},
		{"?limit=12", 12, "vm00,vm01,vm02,vm03,vm04,vm05,vm06,vm07,vm08,vm09,vm10,vm11"},
		{"?limit=1000", 1000, "vm00,vm01,vm02,vm03,vm04,vm05,vm06,vm07,vm08,vm09,vm10,vm11"},
		{"?limit=3&state=running", 3, "vm00,vm03,vm06,vm09"},
		{"?limit=2&state=stopped&host=" + h.name, 2, "vm01,vm02,vm04,vm05,vm07,vm08,vm10,vm11"},
		{"?state=running", 1 << 30, "vm00,vm03,vm06,vm09"},
		{"?limit=4&host=elsewhere", 4, ""},
	}
	// From the mirror, then (the mirror not current) from the store.
	waitMirror(t, m)
	for _, q := range []string{"?limit=12", "?limit=4&state=running"} {
		if _, next, _, _ := get(q); next != "" {
			t.Errorf("from the mirror: %s: a page holding every vm says more follow (%q)", q, next)
		}
	}
	for _, from := range []string{"mirror", "store"} {
		if from == "store" {
			m.cache.mu.Lock()
			m.cache.ready = false
			m.cache.mu.Unlock()
		}
		for _, tc := range cases {
			if got := strings.Join(all(tc.query, tc.limit), ","); got != tc.want {
				t.Errorf("from the %s: %s: listed %s, want %s", from, tc.query, got, tc.want)
			}
		}
	}
	// The last page of an exact fit has no token, filtered or not (vm10
	// and vm11, after the last running one, are stopped), from either.
	for _, q := range []string{"?limit=12", "?limit=4&state=running"} {
		if _, next, _, _ := get(q); next != "" {
			t.Errorf("from the store: %s: a page holding every vm says more follow (%q)", q, next)
		}
	}
	for _, q := range []string{"?limit=0", "?limit=1001", "?limit=x", "?continue=!!", "?continue=" + "QUJD", "?state=asleep"} {
		if _, _, code, body := get(q); code != http.StatusBadRequest || !strings.Contains(body, "error") {
			t.Errorf("%s: %d %s, want 400 with a reason", q, code, body)
		}
	}
}

// TestListingShowsWhatTheStoreHas: a record written to the store (by any
// manager) is in the very next listing from the mirror: the listing waits
// until the mirror has every change the store acknowledged before it.
func TestListingShowsWhatTheStoreHas(t *testing.T) {
	m, _ := newTestManager(t)
	ctx := context.Background()
	for i := 0; i < 50; i++ {
		name := fmt.Sprintf("vm%02d", i)
		putRecord(t, m, record{Spec: hostproto.VMSpec{Name: name, MemoryBytes: 64 << 20, CPUs: 1}, Host: "h7", State: api.StateStopped})
		// Writes the mirror does not watch move the store's revision too.
		if err := m.store.Put(ctx, "hostseen/h7", hostSeenRecord{Seen: time.Now()}); err != nil {
			t.Fatal(err)
		}
		rs := waitMirror(t, m)
		if len(rs) != i+1 || rs[i].rec.Spec.Name != name {
			t.Fatalf("after writing %s the mirror lists %d records", name, len(rs))
		}
		vms, _, err := m.ListPage(ctx, ListOptions{Host: "h7", Limit: 100})
		if err != nil || len(vms) != i+1 {
			t.Fatalf("listing h7 after writing %s: %d vms, %v", name, len(vms), err)
		}
	}
}
