package store

import (
	"context"
	"encoding/json"
	"fmt"
	"sort"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// Claims are keys that say who holds a unique thing (an IP address, a MAC
// address, a VXLAN id): each is created only if nobody holds it, in the same
// transaction as the record that holds it, so two managers can never hand
// out one address twice and a record never exists without its claims.
// Claim keys end with '/', so that deleting one by prefix deletes exactly it.

// ClaimError says which claim was already held, and by whom.
type ClaimError struct {
	Key    string
	Holder string
}

func (e *ClaimError) Error() string { return fmt.Sprintf("%s is held by %s", e.Key, e.Holder) }

// Unwrap makes a ClaimError an ErrExists.
func (e *ClaimError) Unwrap() error { return ErrExists }

// AcquireClaiming is Acquire (store v at key if its revision is still rev,
// and take lock l) that also creates claims (key → holder), all or none.
func (s *Store) AcquireClaiming(ctx context.Context, key string, rev int64, v any, l Lock, claims map[string]string) (int64, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return 0, fmt.Errorf("encode %s: %w", key, err)
	}
	k, lk := s.key(key), s.key(l.Key)
	cmps := []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(k), "=", rev), clientv3.Compare(clientv3.CreateRevision(lk), "=", 0)}
	ops := []clientv3.Op{clientv3.OpPut(k, string(b)), clientv3.OpPut(lk, l.Value, clientv3.WithLease(l.Lease))}
	ck, cmpsC, opsC, err := s.claimOps(claims)
	if err != nil {
		return 0, err
	}
	resp, err := s.cli.Txn(ctx).If(append(cmps, cmpsC...)...).Then(append(ops, opsC...)...).Commit()
	if err != nil {
		return 0, fmt.Errorf("lock %s: %w", key, err)
	}
	if !resp.Succeeded {
		if err := s.heldClaim(ctx, ck); err != nil {
			return 0, err
		}
		if held, who, err := s.Held(ctx, l.Key); err == nil && held {
			return 0, fmt.Errorf("lock %s: %w (%s)", key, ErrLocked, who)
		}
		return 0, fmt.Errorf("lock %s: %w", key, ErrConflict)
	}
	return resp.Header.Revision, nil
}

// CreateClaiming stores v at key, which must not exist, with claims.
func (s *Store) CreateClaiming(ctx context.Context, key string, v any, claims map[string]string) (int64, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return 0, fmt.Errorf("encode %s: %w", key, err)
	}
	k := s.key(key)
	ck, cmps, ops, err := s.claimOps(claims)
	if err != nil {
		return 0, err
	}
	cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(k), "=", 0))
	ops = append(ops, clientv3.OpPut(k, string(b)))
	resp, err := s.cli.Txn(ctx).If(cmps...).Then(ops...).Commit()
	if err != nil {
		return 0, fmt.Errorf("create %s: %w", key, err)
	}
	if !resp.Succeeded {
		if err := s.heldClaim(ctx, ck); err != nil {
			return 0, err
		}
		return 0, fmt.Errorf("create %s: %w", key, ErrExists)
	}
	return resp.Header.Revision, nil
}

// Claim adds claims to an existing record (its revision still rev).
func (s *Store) Claim(ctx context.Context, key string, rev int64, claims map[string]string) error {
	ck, cmps, ops, err := s.claimOps(claims)
	if err != nil {
		return err
	}
	cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(s.key(key)), "=", rev))
	resp, err := s.cli.Txn(ctx).If(cmps...).Then(ops...).Commit()
	if err != nil {
		return fmt.Errorf("claim for %s: %w", key, err)
	}
	if !resp.Succeeded {
		if err := s.heldClaim(ctx, ck); err != nil {
			return err
		}
		return fmt.Errorf("claim for %s: %w", key, ErrConflict)
	}
	return nil
}

func (s *Store) claimOps(claims map[string]string) ([]string, []clientv3.Cmp, []clientv3.Op, error) {
	keys := make([]string, 0, len(claims))
	for c := range claims {
		if c == "" || c[len(c)-1] != '/' {
			return nil, nil, nil, fmt.Errorf("claim key %q must end with '/'", c)
		}
		keys = append(keys, c)
	}
	sort.Strings(keys)
	var cmps []clientv3.Cmp
	var ops []clientv3.Op
	for _, c := range keys {
		cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(s.key(c)), "=", 0))
		ops = append(ops, clientv3.OpPut(s.key(c), claims[c]))
	}
	return keys, cmps, ops, nil
}

// heldClaim returns a ClaimError for the first of keys someone holds.
func (s *Store) heldClaim(ctx context.Context, keys []string) error {
	for _, c := range keys {
		resp, err := s.get(ctx, s.key(c))
		if err != nil {
			return fmt.Errorf("read claim %s: %w", c, err)
		}
		if len(resp.Kvs) > 0 {
			return &ClaimError{Key: c, Holder: string(resp.Kvs[0].Value)}
		}
	}
	return nil
}

// ClaimHolder is who holds claim key ("" if nobody).
func (s *Store) ClaimHolder(ctx context.Context, key string) (string, error) {
	resp, err := s.get(ctx, s.key(key))
	if err != nil {
		return "", fmt.Errorf("read claim %s: %w", key, err)
	}
	if len(resp.Kvs) == 0 {
		return "", nil
	}
	return string(resp.Kvs[0].Value), nil
}

// Release deletes claims (keys ending with '/'); missing ones are fine.
func (s *Store) Release(ctx context.Context, keys ...string) error {
	ops := make([]clientv3.Op, 0, len(keys))
	for _, c := range keys {
		if c == "" || c[len(c)-1] != '/' {
			return fmt.Errorf("claim key %q must end with '/'", c)
		}
		ops = append(ops, clientv3.OpDelete(s.key(c)))
	}
	if _, err := s.cli.Txn(ctx).Then(ops...).Commit(); err != nil {
		return fmt.Errorf("release claims: %w", err)
	}
	return nil
}
