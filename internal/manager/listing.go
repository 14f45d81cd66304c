package manager

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"strconv"

	"github.com/vigil-project/vigil/api"
)

// Listing many VMs: GET /v1/vms takes ?host= and ?state= filters and
// ?limit= pages. A page ends with the Vigil-Continue header when more
// follow: pass it back as ?continue= for the next one. Pages are read from
// the store in bounded ranges, so a page of a large cluster costs about
// its own size, not the cluster's.

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
	if o.Limit <= 0 {
		rs, err := m.records(ctx)
		if err != nil {
			return nil, "", err
		}
		out := []api.VM{}
		for _, s := range rs {
			if match(s.rec) && s.rec.Spec.Name > o.After {
				out = append(out, m.view(s.rec))
			}
		}
		return out, "", nil
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
			out = append(out, m.view(r))
			if len(out) == o.Limit {
				// More follow if the store has more, or this chunk did.
				if more || kv.Key != kvs[len(kvs)-1].Key {
					return out, r.Spec.Name, nil
				}
				return out, "", nil
			}
		}
		if !more {
			return out, "", nil
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
