package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// Lease is an etcd lease: keys written with it go away when it expires
// (its holder stopped renewing it, e.g. its process died).
type Lease = clientv3.LeaseID

// ErrLocked is returned when a lock is held by someone else.
var ErrLocked = fmt.Errorf("locked by another holder")

// ErrLockLost is returned when a write under a lock finds the lock is no
// longer held with the writer's lease (it expired, or was broken).
var ErrLockLost = fmt.Errorf("lock lost")

// Lock guards writes to a record: a lock key bound to the holder's lease.
// Holding it means the key exists with that lease; when the holder dies,
// etcd deletes it with the lease.
type Lock struct {
	Key   string
	Lease Lease
	Value string // who holds it, for people reading the store
}

// held is the condition "this lock is held by l": the key exists, with
// l's lease and l's value (unique per holder, so two holders sharing a
// lease never release each other's lock).
func (l Lock) held(lk string) []clientv3.Cmp {
	return []clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(lk), ">", 0),
		clientv3.Compare(clientv3.LeaseValue(lk), "=", l.Lease), clientv3.Compare(clientv3.Value(lk), "=", l.Value)}
}

// Acquire stores v at key (if its revision is still rev) and takes the
// lock, in one transaction: nobody can slip between reading the record and
// locking it.
func (s *Store) Acquire(ctx context.Context, key string, rev int64, v any, l Lock) (int64, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return 0, fmt.Errorf("encode %s: %w", key, err)
	}
	k, lk := s.key(key), s.key(l.Key)
	resp, err := s.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.ModRevision(k), "=", rev), clientv3.Compare(clientv3.CreateRevision(lk), "=", 0)).
		Then(clientv3.OpPut(k, string(b)), clientv3.OpPut(lk, l.Value, clientv3.WithLease(l.Lease))).
		Else(clientv3.OpGet(lk)).
		Commit()
	if err != nil {
		return 0, fmt.Errorf("lock %s: %w", key, err)
	}
	if !resp.Succeeded {
		if r := resp.Responses[0].GetResponseRange(); r != nil && len(r.Kvs) > 0 {
			return 0, fmt.Errorf("lock %s: %w (%s)", key, ErrLocked, r.Kvs[0].Value)
		}
		return 0, fmt.Errorf("lock %s: %w", key, ErrConflict)
	}
	return resp.Header.Revision, nil
}

// UpdateLocked stores v at key if its revision is still rev and the lock
// is still held with l's lease; with release it also drops the lock. The
// keys in also are written with v, or not at all.
func (s *Store) UpdateLocked(ctx context.Context, key string, rev int64, v any, l Lock, release bool, also ...Also) (int64, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return 0, fmt.Errorf("encode %s: %w", key, err)
	}
	k, lk := s.key(key), s.key(l.Key)
	ops := []clientv3.Op{clientv3.OpPut(k, string(b))}
	if release {
		ops = append(ops, clientv3.OpDelete(lk))
	}
	var resp *clientv3.TxnResponse
	for attempt := 0; ; attempt++ {
		more, err := s.alsoOps(ctx, also)
		if err != nil {
			return 0, err
		}
		resp, err = s.cli.Txn(ctx).
			If(l.held(lk)...).
			Then(clientv3.OpTxn(
				[]clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(k), "=", rev)}, append(ops[:len(ops):len(ops)], more...), nil)).
			Commit()
		if errors.Is(err, rpctypes.ErrLeaseNotFound) && len(also) > 0 && attempt == 0 {
			// A shared TTL lease went (revoked, or a restored backup):
			// the record's write must not fail for its companions' sake.
			s.forgetTTLLeases()
			continue
		}
		if err != nil {
			return 0, fmt.Errorf("update %s: %w", key, err)
		}
		break
	}
	if !resp.Succeeded {
		return 0, fmt.Errorf("update %s: %w", key, ErrLockLost)
	}
	if inner := resp.Responses[0].GetResponseTxn(); inner == nil || !inner.Succeeded {
		return 0, fmt.Errorf("update %s: %w", key, ErrConflict)
	}
	return resp.Header.Revision, nil
}

// GetLocked reads key into v if the lock is still held with l's lease, in
// one read-only transaction (no write reaches etcd's log): ErrLockLost if
// the lock went, ErrNotFound if the key did.
func (s *Store) GetLocked(ctx context.Context, key string, l Lock, v any) (int64, error) {
	k, lk := s.key(key), s.key(l.Key)
	resp, err := s.cli.Txn(ctx).If(l.held(lk)...).Then(clientv3.OpGet(k)).Commit()
	if err != nil {
		return 0, fmt.Errorf("get %s: %w", key, err)
	}
	if !resp.Succeeded {
		return 0, fmt.Errorf("get %s: %w", key, ErrLockLost)
	}
	r := resp.Responses[0].GetResponseRange()
	if r == nil || len(r.Kvs) == 0 {
		return 0, fmt.Errorf("get %s: %w", key, ErrNotFound)
	}
	if err := json.Unmarshal(r.Kvs[0].Value, v); err != nil {
		return 0, fmt.Errorf("decode %s: %w", key, err)
	}
	return r.Kvs[0].ModRevision, nil
}

// DeleteLocked removes key (and keys under prefixes) and the lock, if the
// lock is still held with l's lease.
func (s *Store) DeleteLocked(ctx context.Context, l Lock, key string, prefixes ...string) error {
	lk := s.key(l.Key)
	ops := []clientv3.Op{clientv3.OpDelete(s.key(key)), clientv3.OpDelete(lk)}
	for _, p := range prefixes {
		ops = append(ops, clientv3.OpDelete(s.key(p), clientv3.WithPrefix()))
	}
	resp, err := s.cli.Txn(ctx).
		If(l.held(lk)...).
		Then(ops...).
		Commit()
	if err != nil {
		return fmt.Errorf("delete %s: %w", key, err)
	}
	if !resp.Succeeded {
		return fmt.Errorf("delete %s: %w", key, ErrLockLost)
	}
	return nil
}

// Unlock drops the lock if it is still held with l's lease.
func (s *Store) Unlock(ctx context.Context, l Lock) error {
	lk := s.key(l.Key)
	_, err := s.cli.Txn(ctx).
		If(l.held(lk)...).
		Then(clientv3.OpDelete(lk)).
		Commit()
	if err != nil {
		return fmt.Errorf("unlock %s: %w", l.Key, err)
	}
	return nil
}

// Held tells whether the lock key exists (held by anyone), and its value.
func (s *Store) Held(ctx context.Context, lockKey string) (bool, string, error) {
	resp, err := s.get(ctx, s.key(lockKey))
	if err != nil {
		return false, "", fmt.Errorf("get %s: %w", lockKey, err)
	}
	if len(resp.Kvs) == 0 {
		return false, "", nil
	}
	return true, string(resp.Kvs[0].Value), nil
}

// PutLease stores v at key bound to lease: it goes when the lease does.
func (s *Store) PutLease(ctx context.Context, key string, v any, lease Lease) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode %s: %w", key, err)
	}
	if _, err := s.cli.Put(ctx, s.key(key), string(b), clientv3.WithLease(lease)); err != nil {
		return fmt.Errorf("put %s: %w", key, err)
	}
	return nil
}
