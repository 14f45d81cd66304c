package manager

import (
	"crypto/rand"
	"encoding/base64"
	"sync"
	"time"
)

// A pass is a one-use secret a token holder asks for, for one purpose (a
// scope), when the token itself cannot go where the pass goes: a browser
// cannot put a token on a WebSocket (the console), and a sign-in link
// must not carry a long-lived token. A pass grants no more than the token
// that asked for it, and dies with it (checked again when used). Passes
// live in the memory of the manager that gave them: the browser must use
// it at the same manager (one address, or sticky sessions behind a
// balancer).

const (
	// maxPasses bounds the passes waiting to be used, and maxPassesEach
	// those of one caller: a caller asking for many cannot grow the
	// manager's memory, nor lock others out.
	maxPasses     = 4096
	maxPassesEach = 16
)

type pass struct {
	scope   string
	caller  caller
	expires time.Time
}

// passes are the passes given out and not yet used.
type passes struct {
	mu sync.Mutex
	m  map[string]pass
}

func newPasses() *passes { return &passes{m: map[string]pass{}} }

// issue makes a pass for c, good for scope until now+ttl.
func (ps *passes) issue(scope string, c caller, ttl time.Duration, now time.Time) (string, error) {
	var b [24]byte
	rand.Read(b[:])
	id := base64.RawURLEncoding.EncodeToString(b[:])
	ps.mu.Lock()
	defer ps.mu.Unlock()
	mine := 0
	for k, p := range ps.m {
		switch {
		case now.After(p.expires):
			delete(ps.m, k)
		case p.caller == c:
			mine++
		}
	}
	if mine >= maxPassesEach || len(ps.m) >= maxPasses {
		return "", errorf(ErrUnavailable, "too many passes are waiting to be used: use them, or try again in %s", ttl)
	}
	ps.m[id] = pass{scope: scope, caller: c, expires: now.Add(ttl)}
	return id, nil
}

// redeem uses up pass id for scope and says whose it was (also when it is
// refused, for the audit: the caller is known, the pass is not good).
func (ps *passes) redeem(id, scope string, now time.Time) (caller, error) {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	p, ok := ps.m[id]
	delete(ps.m, id) // one try, right or wrong
	switch {
	case !ok:
		return caller{}, errorf(ErrUnauthorized, "no such pass (each works once): ask for another")
	case now.After(p.expires):
		return p.caller, errorf(ErrUnauthorized, "the pass expired: ask for another")
	case p.scope != scope:
		return p.caller, errorf(ErrForbidden, "the pass is for %s, not %s", p.scope, scope)
	}
	return p.caller, nil
}
