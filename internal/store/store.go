// Package store keeps Vigil's desired state in etcd. The manager is its only
// writer. An embedded single-member etcd is the default; an external cluster
// changes only how the client is built.
package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/metadata"
)

// ErrNotFound is returned when a key does not exist.
var ErrNotFound = errors.New("not found")

// ErrExists is returned by Create when the key is already taken.
var ErrExists = errors.New("already exists")

// ErrConflict is returned by Update when the value changed since it was read.
var ErrConflict = errors.New("changed concurrently")

// Store is a typed key/value view over etcd under one prefix.
type Store struct {
	cli    *clientv3.Client
	prefix string
	// sole says whether the cluster has one member, which may then answer
	// reads alone (see Embedded.Store); nil: never.
	sole func() bool

	leaseMu sync.Mutex
	leases  map[time.Duration]ttlLease // by TTL, shared by the keys written with it
}

// ttlLease is a lease shared by keys written with one TTL until renewAt.
type ttlLease struct {
	id      clientv3.LeaseID
	renewAt time.Time
}

// New wraps an etcd client. Keys are kept under prefix (e.g. "/vigil/").
func New(cli *clientv3.Client, prefix string) *Store {
	return &Store{cli: cli, prefix: prefix}
}

// get reads from etcd: serializable on a cluster of one (see
// Embedded.Store).
func (s *Store) get(ctx context.Context, key string, opts ...clientv3.OpOption) (*clientv3.GetResponse, error) {
	if s.sole != nil && s.sole() {
		opts = append(opts, clientv3.WithSerializable())
	}
	return s.cli.Get(ctx, key, opts...)
}

// Client returns the etcd client, for leader election and watches.
func (s *Store) Client() *clientv3.Client { return s.cli }

func (s *Store) key(k string) string { return s.prefix + k }

// Get decodes the JSON value at key into v and returns its modification
// revision, which Update uses to detect concurrent writers.
func (s *Store) Get(ctx context.Context, key string, v any) (int64, error) {
	resp, err := s.get(ctx, s.key(key))
	if err != nil {
		return 0, fmt.Errorf("get %s: %w", key, err)
	}
	if len(resp.Kvs) == 0 {
		return 0, fmt.Errorf("get %s: %w", key, ErrNotFound)
	}
	if err := json.Unmarshal(resp.Kvs[0].Value, v); err != nil {
		return 0, fmt.Errorf("decode %s: %w", key, err)
	}
	return resp.Kvs[0].ModRevision, nil
}

// Create stores v at key only if the key does not exist yet.
func (s *Store) Create(ctx context.Context, key string, v any) (int64, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return 0, fmt.Errorf("encode %s: %w", key, err)
	}
	k := s.key(key)
	resp, err := s.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(k), "=", 0)).
		Then(clientv3.OpPut(k, string(b))).
		Commit()
	if err != nil {
		return 0, fmt.Errorf("create %s: %w", key, err)
	}
	if !resp.Succeeded {
		return 0, fmt.Errorf("create %s: %w", key, ErrExists)
	}
	return resp.Header.Revision, nil
}

// Update stores v at key if its revision is still rev (compare-and-swap).
func (s *Store) Update(ctx context.Context, key string, rev int64, v any) (int64, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return 0, fmt.Errorf("encode %s: %w", key, err)
	}
	k := s.key(key)
	resp, err := s.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.ModRevision(k), "=", rev)).
		Then(clientv3.OpPut(k, string(b))).
		Commit()
	if err != nil {
		return 0, fmt.Errorf("update %s: %w", key, err)
	}
	if !resp.Succeeded {
		return 0, fmt.Errorf("update %s: %w", key, ErrConflict)
	}
	return resp.Header.Revision, nil
}

// PutIf stores v at key if condKey's modification revision is still
// condRev (0: condKey does not exist). Two writers that each read the
// other's key before writing their own cannot both succeed.
func (s *Store) PutIf(ctx context.Context, key string, v any, condKey string, condRev int64) (int64, error) {
	return s.PutAllIf(ctx, []Cond{{condKey, condRev}}, Pair{key, v})
}

// Pair is a key and the value to store there.
type Pair struct {
	Key   string
	Value any
}

// Cond requires Key to be at revision Rev (0: not to exist).
type Cond struct {
	Key string
	Rev int64
}

// PutAllIf stores every pair, in one revision, if every condition holds;
// it returns that revision.
func (s *Store) PutAllIf(ctx context.Context, conds []Cond, pairs ...Pair) (int64, error) {
	if len(pairs) == 0 {
		return 0, errors.New("put nothing: give at least one key")
	}
	ops := make([]clientv3.Op, 0, len(pairs))
	for _, p := range pairs {
		b, err := json.Marshal(p.Value)
		if err != nil {
			return 0, fmt.Errorf("encode %s: %w", p.Key, err)
		}
		ops = append(ops, clientv3.OpPut(s.key(p.Key), string(b)))
	}
	cmps := make([]clientv3.Cmp, 0, len(conds))
	var keys []string
	for _, c := range conds {
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(s.key(c.Key)), "=", c.Rev))
		keys = append(keys, c.Key)
	}
	resp, err := s.cli.Txn(ctx).If(cmps...).Then(ops...).Commit()
	if err != nil {
		return 0, fmt.Errorf("put %s: %w", pairs[0].Key, err)
	}
	if !resp.Succeeded {
		return 0, fmt.Errorf("put %s: %s changed: %w", pairs[0].Key, strings.Join(keys, " or "), ErrConflict)
	}
	return resp.Header.Revision, nil
}

// PutIfBoth stores v at key if key's revision is still rev and condKey's is
// still condRev (0: condKey does not exist).
func (s *Store) PutIfBoth(ctx context.Context, key string, rev int64, v any, condKey string, condRev int64) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode %s: %w", key, err)
	}
	resp, err := s.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.ModRevision(s.key(key)), "=", rev),
			clientv3.Compare(clientv3.ModRevision(s.key(condKey)), "=", condRev)).
		Then(clientv3.OpPut(s.key(key), string(b))).
		Commit()
	if err != nil {
		return fmt.Errorf("put %s: %w", key, err)
	}
	if !resp.Succeeded {
		return fmt.Errorf("put %s: it or %s changed: %w", key, condKey, ErrConflict)
	}
	return nil
}

// PutPair stores a at keyA if keyA's revision is still revA (0: it does
// not exist) and b at keyB if keyB's is still revB, both or neither.
func (s *Store) PutPair(ctx context.Context, keyA string, revA int64, a any, keyB string, revB int64, b any) error {
	ba, err := json.Marshal(a)
	if err != nil {
		return fmt.Errorf("encode %s: %w", keyA, err)
	}
	bb, err := json.Marshal(b)
	if err != nil {
		return fmt.Errorf("encode %s: %w", keyB, err)
	}
	resp, err := s.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.ModRevision(s.key(keyA)), "=", revA),
			clientv3.Compare(clientv3.ModRevision(s.key(keyB)), "=", revB)).
		Then(clientv3.OpPut(s.key(keyA), string(ba)), clientv3.OpPut(s.key(keyB), string(bb))).
		Commit()
	if err != nil {
		return fmt.Errorf("put %s and %s: %w", keyA, keyB, err)
	}
	if !resp.Succeeded {
		return fmt.Errorf("put %s and %s: one changed: %w", keyA, keyB, ErrConflict)
	}
	return nil
}

// Count is how many keys there are under prefix.
func (s *Store) Count(ctx context.Context, prefix string) (int64, error) {
	resp, err := s.get(ctx, s.key(prefix), clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		return 0, fmt.Errorf("count %s: %w", prefix, err)
	}
	return resp.Count, nil
}

// Delete removes key. Deleting a missing key is not an error.
func (s *Store) Delete(ctx context.Context, key string) error {
	if _, err := s.cli.Delete(ctx, s.key(key)); err != nil {
		return fmt.Errorf("delete %s: %w", key, err)
	}
	return nil
}

// Put stores v at key unconditionally (for records with one writer per key).
func (s *Store) Put(ctx context.Context, key string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode %s: %w", key, err)
	}
	if _, err := s.cli.Put(ctx, s.key(key), string(b)); err != nil {
		return fmt.Errorf("put %s: %w", key, err)
	}
	return nil
}

// PutTTL stores v at key and lets etcd delete it after ttl to 2×ttl: keys
// written with one ttl within one ttl share a lease, so a stream of
// short-lived keys costs one lease grant per ttl, not one per key.
func (s *Store) PutTTL(ctx context.Context, key string, v any, ttl time.Duration) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode %s: %w", key, err)
	}
	lease, err := s.ttlLease(ctx, ttl)
	if err != nil {
		return fmt.Errorf("put %s: %w", key, err)
	}
	if _, err := s.cli.Put(ctx, s.key(key), string(b), clientv3.WithLease(lease)); err != nil {
		return fmt.Errorf("put %s: %w", key, err)
	}
	return nil
}

// PutTTLAll stores every pair as PutTTL would, in one revision (at most
// MaxTxnOps of them).
func (s *Store) PutTTLAll(ctx context.Context, pairs []Pair, ttl time.Duration) error {
	if len(pairs) == 0 {
		return nil
	}
	if len(pairs) > MaxTxnOps {
		return fmt.Errorf("put %d keys at once: at most %d", len(pairs), MaxTxnOps)
	}
	lease, err := s.ttlLease(ctx, ttl)
	if err != nil {
		return fmt.Errorf("put %s: %w", pairs[0].Key, err)
	}
	ops := make([]clientv3.Op, 0, len(pairs))
	for _, p := range pairs {
		b, err := json.Marshal(p.Value)
		if err != nil {
			return fmt.Errorf("encode %s: %w", p.Key, err)
		}
		ops = append(ops, clientv3.OpPut(s.key(p.Key), string(b), clientv3.WithLease(lease)))
	}
	if _, err := s.cli.Txn(ctx).Then(ops...).Commit(); err != nil {
		return fmt.Errorf("put %s and %d more: %w", pairs[0].Key, len(pairs)-1, err)
	}
	return nil
}

// MaxTxnOps is the most keys one transaction may write (etcd's default
// --max-txn-ops).
const MaxTxnOps = 128

// ttlLease returns the lease that keys written now with ttl share: it lasts
// 2×ttl and is replaced after ttl, so each key lives ttl to 2×ttl. Each ttl
// has its own: a key must never inherit a shorter-lived kind's lease.
func (s *Store) ttlLease(ctx context.Context, ttl time.Duration) (clientv3.LeaseID, error) {
	s.leaseMu.Lock()
	defer s.leaseMu.Unlock()
	if l, ok := s.leases[ttl]; ok && time.Now().Before(l.renewAt) {
		return l.id, nil
	}
	lr, err := s.cli.Grant(ctx, int64((2 * ttl).Seconds()))
	if err != nil {
		return 0, fmt.Errorf("grant lease: %w", err)
	}
	if s.leases == nil {
		s.leases = map[time.Duration]ttlLease{}
	}
	s.leases[ttl] = ttlLease{id: lr.ID, renewAt: time.Now().Add(ttl)}
	return lr.ID, nil
}

// forgetTTLLeases drops the cached TTL leases: the next keys get new ones.
func (s *Store) forgetTTLLeases() {
	s.leaseMu.Lock()
	s.leases = nil
	s.leaseMu.Unlock()
}

// Also is a key written in the same transaction as a record: it lands if
// and only if the record's write does (an audit entry with the change it
// records). With TTL, it goes as PutTTL's keys do.
type Also struct {
	Key   string
	Value any
	TTL   time.Duration
}

func (s *Store) alsoOps(ctx context.Context, also []Also) ([]clientv3.Op, error) {
	var ops []clientv3.Op
	for _, a := range also {
		b, err := json.Marshal(a.Value)
		if err != nil {
			return nil, fmt.Errorf("encode %s: %w", a.Key, err)
		}
		var opts []clientv3.OpOption
		if a.TTL > 0 {
			lease, err := s.ttlLease(ctx, a.TTL)
			if err != nil {
				return nil, fmt.Errorf("put %s: %w", a.Key, err)
			}
			opts = append(opts, clientv3.WithLease(lease))
		}
		ops = append(ops, clientv3.OpPut(s.key(a.Key), string(b), opts...))
	}
	return ops, nil
}

// DeletePrefix removes every key under prefix.
func (s *Store) DeletePrefix(ctx context.Context, prefix string) error {
	if _, err := s.cli.Delete(ctx, s.key(prefix), clientv3.WithPrefix()); err != nil {
		return fmt.Errorf("delete %s*: %w", prefix, err)
	}
	return nil
}

// List returns the raw JSON values of every key under prefix, keyed by the
// part of the key after prefix, in key order.
func (s *Store) List(ctx context.Context, prefix string) ([]KV, error) {
	resp, err := s.get(ctx, s.key(prefix), clientv3.WithPrefix(), clientv3.WithSort(clientv3.SortByKey, clientv3.SortAscend))
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", prefix, err)
	}
	out := make([]KV, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		out = append(out, KV{Key: string(kv.Key[len(s.key(prefix)):]), Value: kv.Value, Revision: kv.ModRevision, Created: kv.CreateRevision})
	}
	return out, nil
}

// ListAfter returns up to limit keys under prefix that sort after the key
// after (empty: from the first), in key order, and whether more follow:
// a list read page by page, each page one bounded etcd range.
func (s *Store) ListAfter(ctx context.Context, prefix, after string, limit int) ([]KV, bool, error) {
	from := s.key(prefix)
	if after != "" {
		from = s.key(prefix+after) + "\x00"
	}
	end := clientv3.GetPrefixRangeEnd(s.key(prefix))
	resp, err := s.get(ctx, from, clientv3.WithRange(end), clientv3.WithLimit(int64(limit)),
		clientv3.WithSort(clientv3.SortByKey, clientv3.SortAscend))
	if err != nil {
		return nil, false, fmt.Errorf("list %s: %w", prefix, err)
	}
	out := make([]KV, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		out = append(out, KV{Key: string(kv.Key[len(s.key(prefix)):]), Value: kv.Value, Revision: kv.ModRevision, Created: kv.CreateRevision})
	}
	return out, resp.More, nil
}

// Scan calls f for every key under prefix (key without the store's
// prefix, value, and the key's modification revision) and returns the
// revision it read at.
func (s *Store) Scan(ctx context.Context, prefix string, f func(key string, value []byte, rev int64)) (int64, error) {
	resp, err := s.get(ctx, s.key(prefix), clientv3.WithPrefix())
	if err != nil {
		return 0, fmt.Errorf("scan %s: %w", prefix, err)
	}
	for _, kv := range resp.Kvs {
		f(string(kv.Key[len(s.prefix):]), kv.Value, kv.ModRevision)
	}
	return resp.Header.Revision, nil
}

// Watch calls f for every put under prefix from revision rev on (with a
// nil value for a delete), until ctx ends or the watch fails.
func (s *Store) Watch(ctx context.Context, prefix string, rev int64, f func(key string, value []byte, rev int64)) error {
	return s.WatchProgress(ctx, prefix, rev, f, nil)
}

// WatchProgress is Watch, and also calls progress (if not nil) with a
// revision when etcd says the watch has delivered every change up to it:
// after RequestProgress, once every watch of this client has caught up.
func (s *Store) WatchProgress(ctx context.Context, prefix string, rev int64, f func(key string, value []byte, rev int64), progress func(rev int64)) error {
	if progress != nil {
		ctx = progressStream(ctx, prefix)
	}
	wch := s.cli.Watch(clientv3.WithRequireLeader(ctx), s.key(prefix), clientv3.WithPrefix(), clientv3.WithRev(rev))
	for resp := range wch {
		if err := resp.Err(); err != nil {
			return fmt.Errorf("watch %s: %w", prefix, err)
		}
		for _, ev := range resp.Events {
			var v []byte
			if ev.Type == clientv3.EventTypePut {
				v = ev.Kv.Value
			}
			f(string(ev.Kv.Key[len(s.prefix):]), v, ev.Kv.ModRevision)
		}
		if progress != nil && resp.IsProgressNotify() {
			progress(resp.Header.Revision)
		}
	}
	return ctx.Err()
}

// RequestProgress asks etcd to tell the watch of prefix that has a
// progress function (WatchProgress) how far it has seen. etcd answers
// only once the watch has caught up (and the store has moved past where
// it started): ask again if no answer comes.
func (s *Store) RequestProgress(ctx context.Context, prefix string) error {
	if err := s.cli.RequestProgress(clientv3.WithRequireLeader(progressStream(ctx, prefix))); err != nil {
		return fmt.Errorf("request watch progress: %w", err)
	}
	return nil
}

// progressStream puts a watch that asks for progress on a gRPC stream of
// its own. etcd answers a progress request for a whole stream, and only
// when every watch on it has caught up: a busy watch of other keys (the
// heartbeats') beside it would hold its answers back.
func progressStream(ctx context.Context, prefix string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "vigil-progress-watch", prefix)
}

// Revision is the store's current revision: every write acknowledged
// before the call has a revision at most this.
func (s *Store) Revision(ctx context.Context) (int64, error) {
	resp, err := s.get(ctx, s.key(""), clientv3.WithCountOnly())
	if err != nil {
		return 0, fmt.Errorf("read the store's revision: %w", err)
	}
	return resp.Header.Revision, nil
}

// KV is one listed entry.
type KV struct {
	Key      string
	Value    []byte
	Revision int64 // of the last change
	Created  int64 // the revision that created the key
}
