package manager

import (
	"flag"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/vigil-project/vigil/api"
)

var updateDocs = flag.Bool("update-docs", false, "rewrite the lifecycle table in docs/architecture.md from the code")

const archDoc = "../../docs/architecture.md"

// lifecycleTable renders the lifecycle as the markdown table the docs show.
func lifecycleTable() string {
	var b strings.Builder
	b.WriteString("| By | From | To |\n|---|---|---|\n")
	join := func(ss []api.VMState) string {
		out := make([]string, len(ss))
		for i, s := range ss {
			out[i] = string(s)
		}
		return strings.Join(out, ", ")
	}
	for _, r := range lifecycle {
		b.WriteString("| " + r.by + " | " + join(r.from) + " | " + join(r.to) + " |\n")
	}
	return b.String()
}

func between(doc, begin, end string) (string, int, int, bool) {
	i := strings.Index(doc, begin)
	j := strings.Index(doc, end)
	if i < 0 || j < i {
		return "", 0, 0, false
	}
	i += len(begin)
	return doc[i:j], i, j, true
}

// TestLifecycleMatchesDocs holds the lifecycle table in code against the
// one in docs/architecture.md, and checks that every arrow of the diagram
// there is a change the table allows. go test -run TestLifecycleMatchesDocs
// -update-docs rewrites the docs' table from the code.
func TestLifecycleMatchesDocs(t *testing.T) {
	b, err := os.ReadFile(archDoc)
	if err != nil {
		t.Fatal(err)
	}
	doc := string(b)
	table, i, j, ok := between(doc, "<!-- lifecycle-table -->\n", "<!-- /lifecycle-table -->")
	if !ok {
		t.Fatalf("%s has no <!-- lifecycle-table --> section", archDoc)
	}
	want := lifecycleTable()
	if *updateDocs {
		if err := os.WriteFile(archDoc, []byte(doc[:i]+want+doc[j:]), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	if table != want {
		t.Fatalf("the lifecycle table in %s differs from the code (run go test ./internal/manager -run TestLifecycleMatchesDocs -update-docs):\n--- docs\n%s--- code\n%s", archDoc, table, want)
	}
	diagram, _, _, ok := between(doc, "<!-- lifecycle-diagram -->\n", "<!-- /lifecycle-diagram -->")
	if !ok {
		t.Fatalf("%s has no <!-- lifecycle-diagram --> section", archDoc)
	}
	arrow := regexp.MustCompile(`^\s*(\w+)\s*-->\s*(\w+)`)
	seen := map[api.VMState]bool{}
	for _, line := range strings.Split(diagram, "\n") {
		m := arrow.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		from, to := api.VMState(m[1]), api.VMState(m[2])
		seen[from], seen[to] = true, true
		if err := checkTransition(from, to); err != nil {
			t.Errorf("the diagram draws %s --> %s, which the lifecycle does not allow", from, to)
		}
	}
	for _, s := range append(slices.Clone(settled), api.StateCreating, api.StateDeleting) {
		if !seen[s] {
			t.Errorf("state %s is not in the diagram", s)
		}
	}
}

// TestTransitions spot-checks the table: the changes operations make are
// allowed, nonsense is not.
func TestTransitions(t *testing.T) {
	for _, tt := range []struct {
		from, to api.VMState
		ok       bool
	}{
		{api.StateStopped, api.StateStarting, true},
		{api.StateRunning, api.StatePaused, true},
		{api.StatePaused, api.StateSuspended, true},
		{api.StateRunning, api.StateMigrating, true},
		{api.StateMigrating, api.StateRunning, true},
		{api.StateRunning, api.StateRunning, true},
		{api.StateDeleting, api.StateRunning, false},
		{api.StateCreating, api.StateRunning, false},
		{api.StateDeleting, api.StateStopped, false},
		{api.StateSuspended, api.StatePaused, true}, // the reconciler, after a suspend cut short
		{api.StateFailed, api.StateRunning, true},   // the reconciler: the host runs it after all
		{api.StateStopped, api.StateMigrating, false},
	} {
		if err := checkTransition(tt.from, tt.to); (err == nil) != tt.ok {
			t.Errorf("%s → %s: %v, want allowed=%v", tt.from, tt.to, err, tt.ok)
		}
	}
}
