package manager

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/pki"
)

// Roles of API tokens, from least to most.
const (
	RoleViewer   = "viewer"   // read, events, metrics
	RoleOperator = "operator" // VM lifecycle, snapshots, exec, migrate, drain
	RoleAdmin    = "admin"    // everything, tokens and join tokens included
)

var roleRank = map[string]int{RoleViewer: 1, RoleOperator: 2, RoleAdmin: 3}

// tokenRecord is an API token under "apitokens/<id>": only the hash of its
// secret is kept, so reading the store does not let anyone in.
type tokenRecord struct {
	ID        string    `json:"id"`
	Name      string    `json:"name"`
	Role      string    `json:"role"`
	Hash      string    `json:"hash"`
	Created   time.Time `json:"created"`
	CreatedBy string    `json:"created_by,omitempty"`
	Expires   time.Time `json:"expires,omitzero"`
}

func tokenKey(id string) string { return "apitokens/" + id }

// tokenCache mirrors "apitokens/" in memory (every manager watches it), so
// checking a token costs a hash and a map lookup, not a store read.
type tokenCache struct {
	mu   sync.RWMutex
	byID map[string]tokenRecord
}

func (c *tokenCache) put(r tokenRecord) {
	c.mu.Lock()
	c.byID[r.ID] = r
	c.mu.Unlock()
}

func (c *tokenCache) drop(id string) {
	c.mu.Lock()
	delete(c.byID, id)
	c.mu.Unlock()
}

func (c *tokenCache) get(id string) (tokenRecord, bool) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	r, ok := c.byID[id]
	return r, ok
}

// watchTokens keeps the cache in step with the store until ctx ends.
func (m *Manager) watchTokens(ctx context.Context) {
	apply := func(key string, value []byte, _ int64) {
		id := strings.TrimPrefix(key, "apitokens/")
		if value == nil {
			m.tokens.drop(id)
			return
		}
		var r tokenRecord
		if json.Unmarshal(value, &r) == nil {
			m.tokens.put(r)
		}
	}
	for ctx.Err() == nil {
		rev, err := m.store.Scan(ctx, "apitokens/", apply)
		if err == nil {
			err = m.store.Watch(ctx, "apitokens/", rev+1, apply)
		}
		if err != nil && ctx.Err() == nil {
			m.log.Warn("watch api tokens", "err", err)
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
		}
	}
}

// caller is who makes a request.
type caller struct {
	Kind string // "token" or "host"
	Name string
	Role string
	// TokenID is the API token's id (for a token), by which a pass given
	// to it is checked again when used (passes.go).
	TokenID string
}

func (c caller) String() string {
	if c.Kind == "" {
		return "anonymous"
	}
	return c.Kind + ":" + c.Name
}

// authenticate checks a bearer token: a token that is malformed, unknown,
// revoked (deleted) or expired is ErrUnauthorized.
func (m *Manager) authenticate(ctx context.Context, bearer string) (caller, error) {
	raw, ok := strings.CutPrefix(bearer, "Bearer ")
	if !ok || raw == "" {
		return caller{}, errorf(ErrUnauthorized, "no api token: pass one as 'Authorization: Bearer TOKEN' (the CLI reads it from its config, see 'vigil agent --help')")
	}
	t, err := pki.ParseAPIToken(raw)
	if err != nil {
		return caller{}, errorf(ErrUnauthorized, "the api token is malformed")
	}
	r, ok := m.tokens.get(t.ID)
	if !ok {
		// Made a moment ago on another manager, before the watch brought it?
		if _, err := m.store.Get(ctx, tokenKey(t.ID), &r); err != nil {
			return caller{}, errorf(ErrUnauthorized, "the api token is unknown or revoked")
		}
		m.tokens.put(r)
	}
	sum := sha256.Sum256([]byte(t.Secret))
	if subtle.ConstantTimeCompare([]byte(hex.EncodeToString(sum[:])), []byte(r.Hash)) != 1 {
		return caller{}, errorf(ErrUnauthorized, "the api token is unknown or revoked")
	}
	if !r.Expires.IsZero() && time.Now().After(r.Expires) {
		return caller{}, errorf(ErrUnauthorized, "the api token %s expired at %s: ask an admin for a new one", r.Name, r.Expires.Format(time.RFC3339))
	}
	return caller{Kind: "token", Name: r.Name, Role: r.Role, TokenID: r.ID}, nil
}

// stillValid says whether the token c authenticated with still works (not
// revoked, not expired): a pass it was given must not outlive it.
func (m *Manager) stillValid(c caller) error {
	if c.Kind != "token" {
		return nil
	}
	r, ok := m.tokens.get(c.TokenID)
	switch {
	case !ok:
		return errorf(ErrUnauthorized, "the api token %s was revoked", c.Name)
	case !r.Expires.IsZero() && time.Now().After(r.Expires):
		return errorf(ErrUnauthorized, "the api token %s expired at %s", c.Name, r.Expires.Format(time.RFC3339))
	}
	return nil
}

// CreateToken makes an API token; the secret is in the returned string
// only, never stored.
func (m *Manager) CreateToken(ctx context.Context, req api.TokenCreateRequest, by string) (api.TokenCreated, error) {
	if !dnsLabel.MatchString(req.Name) {
		return api.TokenCreated{}, errorf(ErrInvalid, "invalid token name %q: it must be a DNS label", req.Name)
	}
	if _, ok := roleRank[req.Role]; !ok {
		return api.TokenCreated{}, errorf(ErrInvalid, "unknown role %q: use viewer, operator or admin", req.Role)
	}
	if req.TTLSeconds < 0 {
		return api.TokenCreated{}, errorf(ErrInvalid, "ttl %ds is negative", req.TTLSeconds)
	}
	toks, err := m.tokenRecords(ctx)
	if err != nil {
		return api.TokenCreated{}, err
	}
	for _, t := range toks {
		if t.Name == req.Name {
			return api.TokenCreated{}, errorf(ErrConflict, "a token named %s exists: revoke it first with 'vigil token revoke %s', or pick another name", req.Name, req.Name)
		}
	}
	t := pki.NewAPIToken()
	sum := sha256.Sum256([]byte(t.Secret))
	rec := tokenRecord{ID: t.ID, Name: req.Name, Role: req.Role, Hash: hex.EncodeToString(sum[:]), Created: time.Now().UTC(), CreatedBy: by}
	if req.TTLSeconds > 0 {
		rec.Expires = rec.Created.Add(time.Duration(req.TTLSeconds) * time.Second)
	}
	if _, err := m.store.Create(ctx, tokenKey(t.ID), rec); err != nil {
		return api.TokenCreated{}, wrapf(ErrUnavailable, err, "store token %s", req.Name)
	}
	m.tokens.put(rec)
	return api.TokenCreated{Token: t.String(), Info: rec.view()}, nil
}

func (r tokenRecord) view() api.TokenInfo {
	out := api.TokenInfo{Name: r.Name, Role: r.Role, Created: r.Created, CreatedBy: r.CreatedBy}
	if !r.Expires.IsZero() {
		e := r.Expires
		out.Expires = &e
	}
	return out
}

func (m *Manager) tokenRecords(ctx context.Context) ([]tokenRecord, error) {
	kvs, err := m.store.List(ctx, "apitokens/")
	if err != nil {
		return nil, wrapf(ErrUnavailable, err, "list tokens")
	}
	var out []tokenRecord
	for _, kv := range kvs {
		var r tokenRecord
		if json.Unmarshal(kv.Value, &r) == nil {
			out = append(out, r)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// Tokens lists the API tokens (never their secrets).
func (m *Manager) Tokens(ctx context.Context) ([]api.TokenInfo, error) {
	recs, err := m.tokenRecords(ctx)
	if err != nil {
		return nil, err
	}
	out := []api.TokenInfo{}
	for _, r := range recs {
		out = append(out, r.view())
	}
	return out, nil
}

// RevokeToken deletes the token named name: it stops working at once on
// every manager (their caches follow the store).
func (m *Manager) RevokeToken(ctx context.Context, name string) error {
	recs, err := m.tokenRecords(ctx)
	if err != nil {
		return err
	}
	for _, r := range recs {
		if r.Name == name {
			if err := m.store.Delete(ctx, tokenKey(r.ID)); err != nil {
				return wrapf(ErrUnavailable, err, "revoke token %s", name)
			}
			m.tokens.drop(r.ID)
			return nil
		}
	}
	return errorf(ErrNotFound, "no token named %s: see 'vigil token list'", name)
}

// EnsureAdminToken returns a working admin token named name: tok if it is
// one, else a new one (replacing a token of that name). The agents use it
// to write client.yaml.
func (m *Manager) EnsureAdminToken(ctx context.Context, name, tok string) (string, error) {
	if tok != "" {
		if c, err := m.authenticate(ctx, "Bearer "+tok); err == nil && c.Role == RoleAdmin && c.Name == name {
			return tok, nil
		}
	}
	if err := m.RevokeToken(ctx, name); err != nil && !errors.Is(err, ErrNotFound) {
		return "", err
	}
	t, err := m.CreateToken(ctx, api.TokenCreateRequest{Name: name, Role: RoleAdmin}, "vigil agent")
	return t.Token, err
}

// authorized tells whether role may do what needs need.
func authorized(role, need string) bool { return roleRank[role] >= roleRank[need] }
