package manager

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/vigil-project/vigil/api"
)

// Every mutating call is audited: who, what, when and the result. An entry
// goes on the event stream at once (type "audit") and into the store
// ("audit/<time>-<instance>", kept auditTTL to 2×auditTTL) shortly after,
// by one writer, so a burst of calls does not wait on the store.

const auditTTL = 30 * 24 * time.Hour

func (m *Manager) audit(e api.AuditEntry) {
	e.Time = e.Time.UTC()
	m.publishAudit(e)
	select {
	case m.auditQ <- e:
	default:
		m.log.Error("audit entry not stored: queue full", "actor", e.Actor, "action", e.Action, "status", e.Status)
	}
}

// publishAudit puts an audit entry on the event stream.
func (m *Manager) publishAudit(e api.AuditEntry) {
	msg := fmt.Sprintf("%s %s: %d", e.Actor, e.Action, e.Status)
	m.publish(api.Event{Type: "audit", VM: e.VM, Host: e.Host, Message: msg, Audit: &e})
}

// auditKey is where entry e is stored.
func (m *Manager) auditKey(e api.AuditEntry) string {
	return fmt.Sprintf("audit/%019d-%s", e.Time.UnixNano(), m.instance)
}

// auditWriter stores audit entries until ctx ends, then what is queued.
func (m *Manager) auditWriter(ctx context.Context) {
	write := func(e api.AuditEntry) {
		wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		if err := m.store.PutTTL(wctx, m.auditKey(e), e, auditTTL); err != nil {
			m.log.Error("store audit entry", "actor", e.Actor, "action", e.Action, "err", err)
		}
	}
	for {
		select {
		case e := <-m.auditQ:
			write(e)
		case <-ctx.Done():
			for {
				select {
				case e := <-m.auditQ:
					write(e)
				default:
					return
				}
			}
		}
	}
}

// Audit lists the last limit audit entries, oldest first.
func (m *Manager) Audit(ctx context.Context, limit int) ([]api.AuditEntry, error) {
	if limit <= 0 || limit > 10000 {
		limit = 100
	}
	kvs, err := m.store.List(ctx, "audit/")
	if err != nil {
		return nil, wrapf(ErrUnavailable, err, "list the audit trail")
	}
	if len(kvs) > limit {
		kvs = kvs[len(kvs)-limit:]
	}
	out := []api.AuditEntry{}
	for _, kv := range kvs {
		var e api.AuditEntry
		if json.Unmarshal(kv.Value, &e) == nil {
			out = append(out, e)
		}
	}
	return out, nil
}
