package manager

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/hostproto"
	"github.com/vigil-project/vigil/internal/pki"
	"github.com/vigil-project/vigil/internal/remotehost"
	"github.com/vigil-project/vigil/internal/store"
)

// JoinTokenTTL is how long a join token admits a host.
const JoinTokenTTL = time.Hour

// joinTokenRecord is a join token under "jointokens/<id>": only the hash of
// its secret is kept, so reading the store does not let anyone join.
type joinTokenRecord struct {
	Hash    string    `json:"hash"`
	Expires time.Time `json:"expires"`
	// Host, if set, is the only name the token admits; such a token may
	// replace a registered host (one that lost its keys).
	Host string `json:"host,omitempty"`
	// UsedBy is the host that joined with it: a token admits once.
	UsedBy string `json:"used_by,omitempty"`
}

// hostRecord is a registered remote host under "hosts/<name>".
type hostRecord struct {
	Name         string    `json:"name"`
	Addr         string    `json:"addr"`
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

// noTrust is the error of a host endpoint on a manager without a CA (a
// unit test's manager).
func noTrust() error {
	return errorf(ErrUnavailable, "this manager has no cluster ca: hosts cannot join it")
}

// JoinToken makes a token that admits one new host (or, with host, one
// host of that name, even if registered) for JoinTokenTTL. It carries the
// cluster CA's fingerprint.
func (m *Manager) JoinToken(ctx context.Context, host string) (api.JoinToken, error) {
	if m.identity == nil {
		return api.JoinToken{}, noTrust()
	}
	return JoinTokens{Store: m.store, CA: m.identity.CA}.JoinToken(ctx, host)
}

// JoinTokens mints and revokes join tokens: the manager's API does, and so
// does a boot service for the machines it configures (on a manager, or
// alone with the store).
type JoinTokens struct {
	Store *store.Store
	CA    *pki.CA
}

// JoinToken makes a token that admits one new host (or, with host, one
// host of that name, even if registered) for JoinTokenTTL.
func (j JoinTokens) JoinToken(ctx context.Context, host string) (api.JoinToken, error) {
	if host != "" && !dnsLabel.MatchString(host) {
		return api.JoinToken{}, errorf(ErrInvalid, "invalid host name %q: it must be a DNS label", host)
	}
	t := pki.NewJoinToken(pki.Fingerprint(j.CA.Cert))
	exp := time.Now().Add(JoinTokenTTL).UTC()
	if _, err := j.Store.Create(ctx, "jointokens/"+t.ID, joinTokenRecord{Hash: hashHex(t.Secret), Expires: exp, Host: host}); err != nil {
		return api.JoinToken{}, wrapf(ErrUnavailable, err, "store join token")
	}
	return api.JoinToken{Token: t.String(), Expires: exp, Host: host}, nil
}

// RevokeJoinToken deletes join token id unless a host already joined with
// it (the boot service revokes a machine's last token when it issues the
// next or the machine is quarantined).
func (j JoinTokens) RevokeJoinToken(ctx context.Context, id string) error {
	var tr joinTokenRecord
	if _, err := j.Store.Get(ctx, "jointokens/"+id, &tr); err != nil || tr.UsedBy != "" {
		return nil
	}
	return j.Store.Delete(ctx, "jointokens/"+id)
}

// Join admits a new host: it presents a valid, unused join token and a
// certificate request, and gets a certificate naming it. A token admits a
// name that is not registered yet, or the one name it was made for: it
// never lets a host take another host's identity.
func (m *Manager) Join(ctx context.Context, req hostproto.Join) (hostproto.Joined, error) {
	if m.identity == nil {
		return hostproto.Joined{}, noTrust()
	}
	if !dnsLabel.MatchString(req.Name) {
		return hostproto.Joined{}, errorf(ErrInvalid, "invalid host name %q: it must be a DNS label", req.Name)
	}
	if err := m.checkRegister(req.Name, req.Register); err != nil {
		return hostproto.Joined{}, err
	}
	tok, err := pki.ParseJoinToken(req.Token)
	if err != nil {
		return hostproto.Joined{}, errorf(ErrUnauthorized, "host %s: %v", req.Name, err)
	}
	refuse := errorf(ErrUnauthorized, "host %s presented no valid join token: make one with 'vigil host join-token' and pass it with --join-token", req.Name)
	var tr joinTokenRecord
	trev, err := m.store.Get(ctx, "jointokens/"+tok.ID, &tr)
	switch {
	case errors.Is(err, store.ErrNotFound):
		return hostproto.Joined{}, refuse
	case err != nil:
		return hostproto.Joined{}, wrapf(ErrUnavailable, err, "check join token")
	case subtle.ConstantTimeCompare([]byte(hashHex(tok.Secret)), []byte(tr.Hash)) != 1:
		return hostproto.Joined{}, refuse
	case time.Now().After(tr.Expires):
		return hostproto.Joined{}, errorf(ErrUnauthorized, "the join token of host %s expired at %s: make a new one with 'vigil host join-token'", req.Name, tr.Expires.Format(time.RFC3339))
	case tr.UsedBy != "":
		return hostproto.Joined{}, errorf(ErrUnauthorized, "the join token of host %s was already used (by host %s): make a new one with 'vigil host join-token'", req.Name, tr.UsedBy)
	case tr.Host != "" && tr.Host != req.Name:
		return hostproto.Joined{}, errorf(ErrUnauthorized, "the join token was made for host %s, not %s", tr.Host, req.Name)
	}
	var prev hostRecord
	_, err = m.store.Get(ctx, "hosts/"+req.Name, &prev)
	if err == nil && tr.Host != req.Name {
		return hostproto.Joined{}, errorf(ErrForbidden,
			"a host named %s is already registered: a join token does not let a new host take its name. To replace that host (it lost its keys), make a token for it with 'vigil host join-token --host %s'",
			req.Name, req.Name)
	}
	if err != nil && !errors.Is(err, store.ErrNotFound) {
		return hostproto.Joined{}, wrapf(ErrUnavailable, err, "read host %s", req.Name)
	}
	certPEM, err := m.signHost(req.Name, req.Addr, req.CSR)
	if err != nil {
		return hostproto.Joined{}, err
	}
	tr.UsedBy = req.Name
	if _, err := m.store.Update(ctx, "jointokens/"+tok.ID, trev, tr); err != nil {
		return hostproto.Joined{}, wrapf(ErrUnavailable, err, "use join token")
	}
	if err := m.admit(ctx, req.Name, req.Register, prev.Drained); err != nil {
		return hostproto.Joined{}, err
	}
	return hostproto.Joined{Cert: string(certPEM), CA: string(m.identity.CA.CertPEM)}, nil
}

// signHost issues a host certificate for the key of csrPEM, naming the
// host and the address it is reached at.
func (m *Manager) signHost(name, addr, csrPEM string) ([]byte, error) {
	csr, err := pki.ParseCSR([]byte(csrPEM))
	if err != nil {
		return nil, errorf(ErrInvalid, "host %s: %v", name, err)
	}
	p := pki.Profile{Role: pki.RoleHost, Name: name, TTL: m.certTTL}
	if host, _, err := net.SplitHostPort(addr); err == nil {
		if ip := net.ParseIP(host); ip != nil {
			p.IPs = []net.IP{ip}
		} else if host != "" {
			p.DNSNames = []string{host}
		}
	}
	cert, err := m.identity.CA.Sign(csr, p)
	if err != nil {
		return nil, wrapf(ErrUnavailable, err, "sign the certificate of host %s", name)
	}
	return cert, nil
}

// checkRegister refuses what a manager cannot work with.
func (m *Manager) checkRegister(name string, req hostproto.Register) error {
	if _, _, err := net.SplitHostPort(req.Addr); err != nil {
		return errorf(ErrInvalid, "host %s gave no address to reach it at (host:port): %q", name, req.Addr)
	}
	fence := time.Duration(req.FenceAfterMS) * time.Millisecond
	if fence <= 0 || fence+fenceMargin > m.deadAfter {
		return errorf(ErrForbidden,
			"host %s fences itself after %s, but the managers declare a host dead after %s: a host must fence at least %s before that; give it --fence-after %s or less",
			name, fence, m.deadAfter, fenceMargin, m.deadAfter-fenceMargin)
	}
	return nil
}

// Register takes a joined host back after a restart (or after it fenced):
// its certificate names it, and only a registered host may register.
func (m *Manager) Register(ctx context.Context, name string, req hostproto.Register) error {
	if m.identity == nil {
		return noTrust()
	}
	if err := m.checkRegister(name, req); err != nil {
		return err
	}
	var prev hostRecord
	if _, err := m.store.Get(ctx, "hosts/"+name, &prev); errors.Is(err, store.ErrNotFound) {
		return errorf(ErrUnauthorized, "host %s is not registered (it was removed, or the cluster is new): join it again with a new join token", name)
	} else if err != nil {
		return wrapf(ErrUnavailable, err, "read host %s", name)
	}
	return m.admit(ctx, name, req, prev.Drained)
}

// Renew issues a registered host a new certificate for a new key.
func (m *Manager) Renew(ctx context.Context, name string, req hostproto.Renew) (hostproto.Joined, error) {
	if m.identity == nil {
		return hostproto.Joined{}, noTrust()
	}
	var rec hostRecord
	if _, err := m.store.Get(ctx, "hosts/"+name, &rec); err != nil {
		return hostproto.Joined{}, errorf(ErrUnauthorized, "host %s is not registered: join it again with a new join token", name)
	}
	cert, err := m.signHost(name, rec.Addr, req.CSR)
	if err != nil {
		return hostproto.Joined{}, err
	}
	return hostproto.Joined{Cert: string(cert), CA: string(m.identity.CA.CertPEM)}, nil
}

// admit records the host as alive (clearing a death: the host fenced
// before it registered again) and starts talking to it.
func (m *Manager) admit(ctx context.Context, name string, req hostproto.Register, drained bool) error {
	rec := hostRecord{Name: name, Addr: req.Addr, RegisteredAt: time.Now().UTC(), FenceAfterMS: req.FenceAfterMS, Drained: drained}
	if err := m.store.Put(ctx, "hosts/"+name, rec); err != nil {
		return wrapf(ErrUnavailable, err, "record host %s", name)
	}
	h := m.newRemote(name, req.Addr)
	h.Heartbeat(hostproto.Heartbeat{Info: req.Info}, 0, time.Now())
	m.AddHost(h)
	m.holdReport(name, 0, nil) // a new start: no report of before stands
	m.setDrained(name, drained)
	m.setDead(name, time.Time{})
	m.log.Info("host registered", "host", name, "addr", req.Addr)
	m.publish(api.Event{Type: "host.up", Host: name, Message: "registered from " + req.Addr})
	return nil
}

// newRemote is a remote host reached over mutual TLS: it must present
// the host certificate for its name.
func (m *Manager) newRemote(name, addr string) *remotehost.Host {
	var tlsConf *tls.Config
	if m.identity != nil {
		tlsConf = m.identity.HostClientTLS(name)
	}
	return remotehost.New(name, addr, tlsConf)
}

// hostStatusRecord is the latest report of a host, under "hoststatus/<name>"
// (see storeHeartbeat for when it is written).
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
// remote host.
func (m *Manager) applyStatus(name string, st hostStatusRecord, rev int64) {
	h := m.remote(name)
	if h == nil {
		return
	}
	h.Heartbeat(st.Heartbeat, rev, st.Seen)
	m.noteStored(name, st.Heartbeat, rev)
}

// applySeen feeds a host's stored liveness (at store revision rev) to its
// remote host, and remembers the revision: declaring the host dead is only
// allowed while the stored liveness is still that one.
func (m *Manager) applySeen(name string, rev int64, seen time.Time) {
	h := m.remote(name)
	if h == nil {
		return
	}
	h.Seen(rev, seen)
	m.hosts.mu.Lock()
	if e, ok := m.hosts.hosts[name]; ok && rev > e.seenRev {
		e.seenRev = rev
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
			if cur == nil || cur.Addr() != rec.Addr {
				cur = m.newRemote(rec.Name, rec.Addr)
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
			if rec.DeadAt == nil {
				m.setLiveRecordRev(rec.Name, rev)
				m.forgetStored(rec.Name)
			}
		case strings.HasPrefix(key, "hoststatus/"):
			var st hostStatusRecord
			if json.Unmarshal(value, &st) != nil {
				return
			}
			m.applyStatus(strings.TrimPrefix(key, "hoststatus/"), st, rev)
		case strings.HasPrefix(key, "hostseen/"):
			var seen hostSeenRecord
			if json.Unmarshal(value, &seen) != nil {
				return
			}
			m.applySeen(strings.TrimPrefix(key, "hostseen/"), rev, seen.Seen)
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
// Its certificate named the host; it reports only for itself: an event
// that claims another host is dropped (and audited).
func (m *Manager) Heartbeat(ctx context.Context, name string, hb hostproto.Heartbeat) error {
	if m.remote(name) == nil {
		return errorf(ErrUnauthorized, "host %s is not registered with this manager: register again", name)
	}
	gone := func(dead time.Time) error {
		return errorf(ErrGone, "host %s was declared dead at %s and its vms may run elsewhere: kill them and register again", name, dead.Format(time.RFC3339Nano))
	}
	if st := m.hostState(name); st == "dead" {
		return gone(time.Now())
	}
	same := hb.Same
	if same != 0 {
		held, ok := m.heldReport(name, same)
		if !ok {
			return errorf(ErrConflict, "this manager does not hold report %d of host %s: send every vm's status", hb.Same, name)
		}
		statuses, err := hostproto.WithTicks(held, hb.Guests)
		if err != nil {
			return wrapf(ErrConflict, err, "host %s: send every vm's status", name)
		}
		hb.Statuses, hb.Same, hb.Guests = statuses, 0, nil
	}
	wasDown := m.hostState(name) != "up"
	now := time.Now().UTC()
	// Share it first: every manager answers for every host, and the leader
	// judges hosts by what is in the store. A heartbeat that did not reach
	// the store is refused, so the host counts it as missed and fences in
	// time if this manager is cut off from the others. It is stored only if
	// the host's record did not change since it was read here, and the
	// leader declares a host dead only if its liveness record did not change
	// since it last saw it: a heartbeat and a death cannot both win.
	shared := hb
	shared.Events, shared.Report = nil, 0
	sctx, cancel := context.WithTimeout(ctx, 2500*time.Millisecond)
	defer cancel()
	rev, withStatus, err := m.shareHeartbeat(sctx, name, shared, now)
	if de := (*deadError)(nil); errors.As(err, &de) {
		m.setDead(name, de.at)
		return gone(de.at)
	}
	if err != nil {
		return wrapf(ErrUnavailable, err, "record heartbeat of host %s", name)
	}
	m.applySeen(name, rev, now)
	statusRev := int64(0) // fresher than any stored status: apply it
	if withStatus {
		statusRev = rev
	}
	if h := m.remote(name); h != nil {
		h.Heartbeat(hb, statusRev, now)
	}
	if same == 0 && hb.Report != 0 {
		m.holdReport(name, hb.Report, hb.Statuses)
	}
	if wasDown {
		m.publish(api.Event{Type: "host.up", Host: name})
	}
	for _, e := range hb.Events {
		if e.Host != name {
			m.log.Warn("dropped an event a host sent for another host", "host", name, "claimed", e.Host, "vm", e.VM, "kind", e.Kind)
			m.audit(api.AuditEntry{Time: time.Now(), Actor: "host:" + name, Role: "host", Action: "event " + string(e.Kind), VM: e.VM, Host: e.Host,
				Status: http.StatusForbidden, Error: fmt.Sprintf("host %s sent an event as host %s: dropped", name, e.Host)})
			continue
		}
		m.HandleHostEvent(e)
	}
	return nil
}

func (m *Manager) handleJoinToken(w http.ResponseWriter, r *http.Request) {
	var req api.JoinTokenRequest
	if r.ContentLength != 0 {
		if err := decodeBody(r, &req); err != nil {
			writeError(w, m.log, err)
			return
		}
	}
	tok, err := m.JoinToken(r.Context(), req.Host)
	if err != nil {
		writeError(w, m.log, err)
		return
	}
	writeJSON(w, http.StatusCreated, tok)
}

func (m *Manager) handleJoin(w http.ResponseWriter, r *http.Request) {
	var req hostproto.Join
	if err := decodeBody(r, &req); err != nil {
		writeError(w, m.log, err)
		return
	}
	*r = *r.WithContext(context.WithValue(r.Context(), callerKey{}, caller{Kind: "host", Name: req.Name, Role: "joining"}))
	out, err := m.Join(r.Context(), req)
	if err != nil {
		writeError(w, m.log, err)
		return
	}
	writeJSON(w, http.StatusOK, out)
}

func (m *Manager) handleRegister(w http.ResponseWriter, r *http.Request) {
	var req hostproto.Register
	if err := decodeBody(r, &req); err != nil {
		writeError(w, m.log, err)
		return
	}
	if err := m.Register(r.Context(), callerOf(r).Name, req); err != nil {
		writeError(w, m.log, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (m *Manager) handleRenew(w http.ResponseWriter, r *http.Request) {
	var req hostproto.Renew
	if err := decodeBody(r, &req); err != nil {
		writeError(w, m.log, err)
		return
	}
	out, err := m.Renew(r.Context(), callerOf(r).Name, req)
	if err != nil {
		writeError(w, m.log, err)
		return
	}
	writeJSON(w, http.StatusOK, out)
}

func (m *Manager) handleHeartbeat(w http.ResponseWriter, r *http.Request) {
	var hb hostproto.Heartbeat
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 16<<20)).Decode(&hb); err != nil {
		writeError(w, m.log, wrapf(ErrInvalid, err, "malformed heartbeat"))
		return
	}
	if err := m.Heartbeat(r.Context(), callerOf(r).Name, hb); err != nil {
		writeError(w, m.log, err)
		return
	}
	w.Header().Set(hostproto.ReportsHeader, hostproto.ReportsSame)
	w.WriteHeader(http.StatusNoContent)
}
