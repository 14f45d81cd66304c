package manager

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/vigil-project/vigil/api"
)

// Listing many VMs: GET /v1/vms takes ?host= and ?state= filters and
// ?limit= pages. A page ends with the Vigil-Continue header when another
// VM the filters select follows: pass it back as ?continue= for the next
// one. Pages are read from the mirror of the records (recordcache.go) once
// it is as current as the store (consistentRecords), so a page, filtered
// or not, costs about its own size, not the cluster's; else from the
// store in bounded ranges.

const (
	maxPageSize = 1000
	// continueHeader carries the token of the next page.
	continueHeader = "Vigil-Continue"
)

// ListOptions narrows a listing of VMs.
type ListOptions struct {
	Host, State string
	// Limit is the largest page (0: every VM); After continues a listing
	// after the VM of that name.
	Limit int
	After string
}

// ListPage lists the VMs the options select, in name order, and the name
// to continue after ("" when this was the last page).
func (m *Manager) ListPage(ctx context.Context, o ListOptions) ([]api.VM, string, error) {
	match := func(r record) bool {
		return (o.Host == "" || r.Host == o.Host) && (o.State == "" || string(r.State) == o.State)
	}
	if rs, ok := m.consistentRecords(ctx); ok {
		return m.pageOf(rs, o, match)
	}
	if o.Limit <= 0 {
		rs, err := m.records(ctx) // in name order, as the mirror's
		if err != nil {
			return nil, "", err
		}
		return m.pageOf(rs, o, match)
	}
	// Filters can skip most of what is read: read in chunks until the page
	// is full or the store has no more.
	chunk := max(o.Limit, 100)
	out := make([]api.VM, 0, o.Limit)
	after := o.After
	for {
		kvs, more, err := m.store.ListAfter(ctx, "vms/", after, chunk)
		if err != nil {
			return nil, "", wrapf(ErrUnavailable, err, "list vms")
		}
		for _, kv := range kvs {
			after = kv.Key
			var r record
			if err := json.Unmarshal(kv.Value, &r); err != nil {
				m.log.Error("skipping unreadable vm record", "key", kv.Key, "err", err)
				continue
			}
			if !match(r) {
				continue
			}
			if len(out) == o.Limit {
				return out, out[len(out)-1].Name, nil // another one follows
			}
			out = append(out, m.view(r))
		}
		if !more {
			return out, "", nil
		}
	}
}

// pageOf is the page of rs (in name order) the options select.
func (m *Manager) pageOf(rs []storedRecord, o ListOptions, match func(record) bool) ([]api.VM, string, error) {
	i, _ := slices.BinarySearchFunc(rs, o.After, func(s storedRecord, name string) int {
		return strings.Compare(s.rec.Spec.Name, name)
	})
	if i < len(rs) && rs[i].rec.Spec.Name == o.After {
		i++
	}
	out := []api.VM{}
	for ; i < len(rs); i++ {
		if !match(rs[i].rec) {
			continue
		}
		if o.Limit > 0 && len(out) == o.Limit {
			return out, out[len(out)-1].Name, nil
		}
		out = append(out, m.view(rs[i].rec))
	}
	return out, "", nil
}

// mirrorWait bounds how long a listing waits for the mirror to catch up
// with the store before it reads the store instead.
const mirrorWait = 500 * time.Millisecond

// progressRetry is how long a listing waits for etcd's progress report
// before asking again: etcd answers only once the mirror's watch has
// caught up.
const progressRetry = 50 * time.Millisecond

// consistentRecords is every VM record in name order, from the mirror once
// it holds every change the store acknowledged before the call (so a
// listing shows a VM created just before, through any manager); false if
// it does not within mirrorWait, or is not current: the caller reads the
// store.
func (m *Manager) consistentRecords(ctx context.Context) ([]storedRecord, bool) {
	if !m.cache.isReady() {
		return nil, false
	}
	rev, err := m.store.Revision(ctx)
	if err != nil {
		return nil, false
	}
	wctx, cancel := context.WithTimeout(ctx, mirrorWait)
	defer cancel()
	var asked time.Time
	for {
		rs, ok, moved := m.cache.at(rev)
		if ok {
			return rs, true
		}
		if moved == nil {
			return nil, false
		}
		// The mirror's watch sees only VM records, and the store's
		// revision moves with every heartbeat: ask etcd how far the
		// watch has seen.
		if time.Since(asked) >= progressRetry {
			if err := m.store.RequestProgress(wctx, "vms/"); err != nil {
				return nil, false
			}
			asked = time.Now()
		}
		select {
		case <-moved:
		case <-time.After(progressRetry):
		case <-wctx.Done():
			return nil, false
		}
	}
}

// listOptions reads a listing's query.
func listOptions(r *http.Request) (ListOptions, error) {
	q := r.URL.Query()
	o := ListOptions{Host: q.Get("host"), State: q.Get("state")}
	if s := q.Get("limit"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 || n > maxPageSize {
			return o, errorf(ErrInvalid, "limit %q: give a number of VMs from 1 to %d", s, maxPageSize)
		}
		o.Limit = n
	}
	if c := q.Get("continue"); c != "" {
		b, err := base64.RawURLEncoding.DecodeString(c)
		if err != nil || !dnsLabel.Match(b) {
			return o, errorf(ErrInvalid, "continue %q is not a token this API gave: pass the %s header of the previous page as it is", c, continueHeader)
		}
		o.After = string(b)
	}
	if o.State != "" && !knownState(api.VMState(o.State)) {
		return o, errorf(ErrInvalid, "state %q: use one of creating, stopped, starting, running, stopping, paused, suspended, crashed, recovering, failed, migrating, deleting", o.State)
	}
	return o, nil
}

func knownState(s api.VMState) bool {
	switch s {
	case api.StateCreating, api.StateStopped, api.StateStarting, api.StateRunning, api.StateStopping, api.StatePaused,
		api.StateSuspended, api.StateCrashed, api.StateRecovering, api.StateFailed, api.StateMigrating, api.StateDeleting:
		return true
	}
	return false
}

func (m *Manager) handleList(w http.ResponseWriter, r *http.Request) {
	o, err := listOptions(r)
	if err != nil {
		writeError(w, m.log, err)
		return
	}
	vms, next, err := m.ListPage(r.Context(), o)
	if err != nil {
		writeError(w, m.log, err)
		return
	}
	if next != "" {
		w.Header().Set(continueHeader, base64.RawURLEncoding.EncodeToString([]byte(next)))
	}
	writeJSON(w, http.StatusOK, vms)
}
