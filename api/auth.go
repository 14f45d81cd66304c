package api

import "time"

// TokenCreateRequest is the body of POST /v1/tokens.
type TokenCreateRequest struct {
	// Name is a DNS label, unique among tokens.
	Name string `json:"name"`
	// Role is viewer (read, events, metrics), operator (VM lifecycle,
	// snapshots, exec, migrate, drain) or admin (everything).
	Role string `json:"role"`
	// TTLSeconds, if not zero, is how long the token works.
	TTLSeconds int64 `json:"ttl_seconds,omitempty"`
}

// TokenInfo describes an API token (never its secret).
type TokenInfo struct {
	Name      string     `json:"name"`
	Role      string     `json:"role"`
	Created   time.Time  `json:"created"`
	CreatedBy string     `json:"created_by,omitempty"`
	Expires   *time.Time `json:"expires,omitempty"`
}

// TokenCreated answers POST /v1/tokens: the token, shown this once.
type TokenCreated struct {
	Token string    `json:"token"`
	Info  TokenInfo `json:"info"`
}

// JoinToken answers POST /v1/hosts/join-tokens.
type JoinToken struct {
	// Token is vj1.ID.SECRET.CA_FINGERPRINT: a host pins the cluster's CA
	// by the fingerprint before it sends anything.
	Token   string    `json:"token"`
	Expires time.Time `json:"expires"`
	// Host, if set, is the only host name the token admits (to replace a
	// host that lost its keys).
	Host string `json:"host,omitempty"`
}

// JoinTokenRequest is the (optional) body of POST /v1/hosts/join-tokens.
type JoinTokenRequest struct {
	// Host binds the token to this host name: it may then re-admit a host
	// already registered under that name (one that lost its keys).
	Host string `json:"host,omitempty"`
}

// AuditEntry is one mutating call, as recorded: who, what, when, result.
type AuditEntry struct {
	Time   time.Time `json:"time"`
	Actor  string    `json:"actor"` // token:NAME or host:NAME
	Role   string    `json:"role,omitempty"`
	Action string    `json:"action"` // METHOD PATH
	VM     string    `json:"vm,omitempty"`
	Host   string    `json:"host,omitempty"`
	Status int       `json:"status"`
	Error  string    `json:"error,omitempty"`
	Remote string    `json:"remote,omitempty"`
}
