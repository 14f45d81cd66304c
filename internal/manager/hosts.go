package manager

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/hostproto"
	"github.com/vigil-project/vigil/internal/remotehost"
	"github.com/vigil-project/vigil/internal/store"
)

// JoinTokenTTL is how long a join token admits a host.
const JoinTokenTTL = time.Hour

// tokenRecord is a join token as stored under "tokens/<sha256>": only the
// hash is kept, so reading the store does not let anyone join.
type tokenRecord struct {
	Expires time.Time `json:"expires"`
	// UsedBy is the host that joined with it; the same host may present
	// it again (a re-registration), no other.
	UsedBy string `json:"used_by,omitempty"`
}

// hostRecord is a registered remote host under "hosts/<name>".
type hostRecord struct {
	Name         string    `json:"name"`
	Addr         string    `json:"addr"`
	SecretHash   string    `json:"secret_hash"`
	Secret       string    `json:"secret"` // the manager must present it to the host
	RegisteredAt time.Time `json:"registered_at"`
	FenceAfterMS int64     `json:"fence_after_ms"`
	// DeadAt is set when the leader declared the host dead (its VMs then
	// move); the host must fence and register again to clear it.
	DeadAt *time.Time `json:"dead_at,omitempty"`
	// LastHeartbeat is the last heartbeat before DeadAt, for the timeline.
	LastHeartbeat time.Time `json:"last_heartbeat,omitzero"`
	// Drained hosts take no new VMs.
	Drained bool `json:"drained,omitempty"`
}

func hashHex(s string) string {
	h := sha256.Sum256([]byte(s))
	return hex.EncodeToString(h[:])
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// JoinToken makes a token that admits one new host for JoinTokenTTL.
func (m *Manager) JoinToken(ctx context.Context) (string, time.Time, error) {
	tok := randomHex(24)
	exp := time.Now().Add(JoinTokenTTL).UTC()
	if _, err := m.store.Create(ctx, "tokens/"+hashHex(tok), tokenRecord{Expires: exp}); err != nil {
		return "", time.Time{}, wrapf(ErrUnavailable, err, "store join token")
	}
	return tok, exp, nil
}

// Register admits a host that presents a valid join token (or the secret
// it was given before), records it and returns its secret.
func (m *Manager) Register(ctx context.Context, req hostproto.Register) (hostproto.Registered, error) {
	if err := validName(req.Name); err != nil {
		return hostproto.Registered{}, errorf(ErrInvalid, "invalid host name %q: it must be a DNS label", req.Name)
	}
	if req.Addr == "" {
		return hostproto.Registered{}, errorf(ErrInvalid, "host %s gave no address to reach it at", req.Name)
	}
	fence := time.Duration(req.FenceAfterMS) * time.Millisecond
	if fence <= 0 || fence+fenceMargin > m.deadAfter {
		return hostproto.Registered{}, errorf(ErrUnauthorized,
			"host %s fences itself after %s, but the managers declare a host dead after %s: a host must fence at least %s before that; give it --fence-after %s or less",
			req.Name, fence, m.deadAfter, fenceMargin, m.deadAfter-fenceMargin)
	}
	var prev hostRecord
	_, err := m.store.Get(ctx, "hosts/"+req.Name, &prev)
	known := err == nil
	// A known host may come back with its secret instead of a token.
	if known && req.Token != "" && subtle.ConstantTimeCompare([]byte(hashHex(req.Token)), []byte(prev.SecretHash)) == 1 {
		return m.admit(ctx, req, prev.Secret, prev.Drained)
	}
	var tr tokenRecord
	trev, err := m.store.Get(ctx, "tokens/"+hashHex(req.Token), &tr)
	switch {
	case req.Token == "" || errors.Is(err, store.ErrNotFound):
		return hostproto.Registered{}, errorf(ErrUnauthorized, "host %s presented no valid join token: make one with 'vigil host join-token' and pass it with --join-token", req.Name)
	case err != nil:
		return hostproto.Registered{}, wrapf(ErrUnavailable, err, "check join token")
	case time.Now().After(tr.Expires):
		return hostproto.Registered{}, errorf(ErrUnauthorized, "the join token of host %s expired at %s: make a new one with 'vigil host join-token'", req.Name, tr.Expires.Format(time.RFC3339))
	case tr.UsedBy != "" && tr.UsedBy != req.Name:
		return hostproto.Registered{}, errorf(ErrUnauthorized, "the join token of host %s was already used by host %s: make a new one with 'vigil host join-token'", req.Name, tr.UsedBy)
	}
	tr.UsedBy = req.Name
	if _, err := m.store.Update(ctx, "tokens/"+hashHex(req.Token), trev, tr); err != nil {
		return hostproto.Registered{}, wrapf(ErrUnavailable, err, "use join token")
	}
	secret := prev.Secret
	if !known {
		secret = randomHex(24)
	}
	return m.admit(ctx, req, secret, prev.Drained)
}

// admit records the host as alive (clearing a death: the host fenced
// before it registered again) and starts talking to it.
func (m *Manager) admit(ctx context.Context, req hostproto.Register, secret string, drained bool) (hostproto.Registered, error) {
	rec := hostRecord{Name: req.Name, Addr: req.Addr, SecretHash: hashHex(secret), Secret: secret, RegisteredAt: time.Now().UTC(),
		FenceAfterMS: req.FenceAfterMS, Drained: drained}
	if err := m.store.Put(ctx, "hosts/"+req.Name, rec); err != nil {
		return hostproto.Registered{}, wrapf(ErrUnavailable, err, "record host %s", req.Name)
	}
	h := remotehost.New(req.Name, req.Addr, secret, nil)
	h.Heartbeat(hostproto.Heartbeat{Info: req.Info}, 0, time.Now())
	m.AddHost(h)
	m.setDrained(req.Name, drained)
	m.setDead(req.Name, time.Time{})
	m.log.Info("host registered", "host", req.Name, "addr", req.Addr)
	m.publish(api.Event{Type: "host.up", Host: req.Name, Message: "registered from " + req.Addr})
	return hostproto.Registered{Secret: secret}, nil
}

// hostStatusRecord is the latest heartbeat of a host, under "hoststatus/<name>".
type hostStatusRecord struct {
	hostproto.Heartbeat
	Seen time.Time `json:"seen"`
}

// remote returns the registry's remote host of that name, if any.
func (m *Manager) remote(name string) *remotehost.Host {
	m.hosts.mu.Lock()
	defer m.hosts.mu.Unlock()
	if e, ok := m.hosts.hosts[name]; ok {
		return e.remote
	}
	return nil
}

// applyStatus feeds a host's stored status (at store revision rev) to its
// remote host, and remembers the revision: declaring the host dead is only
// allowed while the stored status is still that one.
func (m *Manager) applyStatus(name string, st hostStatusRecord, rev int64) {
	h := m.remote(name)
	if h == nil {
		return
	}
	h.Heartbeat(st.Heartbeat, rev, st.Seen)
	m.hosts.mu.Lock()
	if e, ok := m.hosts.hosts[name]; ok && rev > e.statusRev {
		e.statusRev = rev
	}
	m.hosts.mu.Unlock()
}

// WatchHosts keeps this manager's view of hosts in step with the store:
// hosts registered through other managers, and heartbeats they received.
func (m *Manager) WatchHosts(ctx context.Context) {
	apply := func(key string, value []byte, rev int64) {
		if value == nil {
			return
		}
		switch {
		case strings.HasPrefix(key, "hosts/"):
			var rec hostRecord
			if json.Unmarshal(value, &rec) != nil {
				return
			}
			cur := m.remote(rec.Name)
			if cur == nil || cur.Secret() != rec.Secret || cur.Addr() != rec.Addr {
				cur = remotehost.New(rec.Name, rec.Addr, rec.Secret, nil)
				m.AddHost(cur)
			}
			var dead time.Time
			if rec.DeadAt != nil {
				dead = *rec.DeadAt
			} else {
				// Registering counts as being heard from: a host that just
				// (re)joined must not be judged on older silence.
				cur.Heard()
			}
			m.setDead(rec.Name, dead)
			m.setDrained(rec.Name, rec.Drained)
		case strings.HasPrefix(key, "hoststatus/"):
			var st hostStatusRecord
			if json.Unmarshal(value, &st) != nil {
				return
			}
			m.applyStatus(strings.TrimPrefix(key, "hoststatus/"), st, rev)
		}
	}
	for ctx.Err() == nil {
		rev, err := m.store.Scan(ctx, "host", apply)
		if err == nil {
			err = m.store.Watch(ctx, "host", rev+1, apply)
		}
		if err != nil && ctx.Err() == nil {
			m.log.Warn("watch hosts", "err", err)
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
		}
	}
}

// Heartbeat takes a host's heartbeat and the events it carries.
func (m *Manager) Heartbeat(ctx context.Context, name, auth string, hb hostproto.Heartbeat) error {
	h := m.remote(name)
	if h == nil {
		return errorf(ErrUnauthorized, "host %s is not registered with this manager: register again", name)
	}
	if subtle.ConstantTimeCompare([]byte(auth), []byte("Bearer "+h.Secret())) != 1 {
		return errorf(ErrUnauthorized, "host %s presented a wrong secret: register again", name)
	}
	gone := func(dead time.Time) error {
		return errorf(ErrGone, "host %s was declared dead at %s and its vms may run elsewhere: kill them and register again", name, dead.Format(time.RFC3339Nano))
	}
	if st := m.hostState(name); st == "dead" {
		return gone(time.Now())
	}
	wasDown := m.hostState(name) != "up"
	now := time.Now().UTC()
	// Share it first: every manager answers for every host, and the leader
	// judges hosts by what is in the store. A heartbeat that did not reach
	// the store is refused, so the host counts it as missed and fences in
	// time if this manager is cut off from the others. It is stored only if
	// the host's record did not change since it was read here, and the
	// leader declares a host dead only if its status did not change since
	// it last saw it: a heartbeat and a death cannot both win.
	shared := hb
	shared.Events = nil
	sctx, cancel := context.WithTimeout(ctx, 2500*time.Millisecond)
	defer cancel()
	var rec hostRecord
	rev, err := m.store.Get(sctx, "hosts/"+name, &rec)
	if err == nil && rec.DeadAt != nil {
		m.setDead(name, *rec.DeadAt)
		return gone(*rec.DeadAt)
	}
	st := hostStatusRecord{Heartbeat: shared, Seen: now}
	var srev int64
	if err == nil {
		srev, err = m.store.PutIf(sctx, "hoststatus/"+name, st, "hosts/"+name, rev)
	}
	if err != nil {
		return wrapf(ErrUnavailable, err, "record heartbeat of host %s", name)
	}
	st.Heartbeat = hb
	m.applyStatus(name, st, srev)
	if wasDown {
		m.publish(api.Event{Type: "host.up", Host: name})
	}
	for _, e := range hb.Events {
		m.HandleHostEvent(e)
	}
	return nil
}

func (m *Manager) handleJoinToken(w http.ResponseWriter, r *http.Request) {
	tok, exp, err := m.JoinToken(r.Context())
	if err != nil {
		writeError(w, m.log, err)
		return
	}
	writeJSON(w, http.StatusCreated, map[string]any{"token": tok, "expires": exp})
}

func (m *Manager) handleRegister(w http.ResponseWriter, r *http.Request) {
	var req hostproto.Register
	if err := decodeBody(r, &req); err != nil {
		writeError(w, m.log, err)
		return
	}
	reg, err := m.Register(r.Context(), req)
	if err != nil {
		writeError(w, m.log, err)
		return
	}
	writeJSON(w, http.StatusOK, reg)
}

func (m *Manager) handleHeartbeat(w http.ResponseWriter, r *http.Request) {
	var hb hostproto.Heartbeat
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 16<<20)).Decode(&hb); err != nil {
		writeError(w, m.log, wrapf(ErrInvalid, err, "malformed heartbeat"))
		return
	}
	if err := m.Heartbeat(r.Context(), r.PathValue("name"), strings.TrimSpace(r.Header.Get("Authorization")), hb); err != nil {
		writeError(w, m.log, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}
