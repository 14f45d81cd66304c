package manager

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/vigil-project/vigil/internal/store"
)

// A quick operation (pause or resume in memory) costs two durable writes
// when it takes and drops the VM's lock around its work: the intent with
// the lock, then the outcome with the release. The manager instead keeps
// the lock for keepLocksFor after a quick operation: the next operation on
// the same VM through this manager starts without a write, and a quick one
// writes only its outcome. Nothing else changes hands: the lock stays bound
// to this manager's lease (it goes with the manager), and another manager
// that wants the VM meanwhile waits for the release (begin) rather than
// being told the VM is busy (it polls with reads: a refused lock
// transaction would still be a write).
//
// A quick operation on a kept lock records no intent: if the manager dies
// during it, the record is only behind what the host reports (paused or
// running), which the reconciler brings in line like any missed event.
// Nor does it read the record first: every write of a VM's record is made
// under its lock, so while this manager keeps the lock the record it last
// wrote is current (and the write still checks the lock and the revision;
// after a failed write, which may have landed, the record is read again).
// For the same reason its outcome is written while the host acts, not
// after (vmOp.finishQuick). The lock is then trusted without a check of
// its own before the host acts: it was confirmed by a write less than
// keepLocksFor ago, and its lease is the one this manager's session still
// holds. A lease that expired on the server unnoticed (a cut-off manager)
// makes the outcome's write fail, and the answer says the host acted.

// keepLocksFor is how long an idle kept lock stays with this manager.
const keepLocksFor = time.Second

type keptLock struct {
	lock store.Lock
	// record is the VM's record as last written under the lock (JSON: the
	// operation that takes the lock gets its own copy), rev its revision;
	// nil when a write under the lock failed, which may have landed all
	// the same (the next operation reads the record).
	record []byte
	rev    int64
	until  time.Time
}

// load is the record kept with the lock.
func (kl keptLock) load() (record, int64, error) {
	if kl.record == nil {
		return record{}, 0, errors.New("no record kept with the lock")
	}
	var r record
	if err := json.Unmarshal(kl.record, &r); err != nil {
		return record{}, 0, fmt.Errorf("decode the kept record: %w", err)
	}
	return r, kl.rev, nil
}

// keptLocks are the VM locks this manager holds with no operation running.
// Whoever removes a lock from the map owns it: an operation (take) or the
// release of an idle one (expired, all).
type keptLocks struct {
	mu sync.Mutex
	m  map[string]keptLock
}

func newKeptLocks() *keptLocks { return &keptLocks{m: map[string]keptLock{}} }

// take returns vm's kept lock for an operation, if there is one with lease
// (a lock kept under an earlier, expired lease is gone from etcd: dropped).
func (k *keptLocks) take(vm string, lease store.Lease) (keptLock, bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	kl, ok := k.m[vm]
	if !ok {
		return keptLock{}, false
	}
	delete(k.m, vm)
	return kl, kl.lock.Lease == lease
}

// keep puts an idle lock in the map for keepLocksFor, with the record
// last written under it and that write's revision.
func (k *keptLocks) keep(vm string, l store.Lock, r record, rev int64) error {
	b, err := json.Marshal(r)
	if err != nil {
		return fmt.Errorf("keep the record of vm %s: %w", vm, err)
	}
	k.putBack(vm, keptLock{lock: l, record: b, rev: rev, until: time.Now().Add(keepLocksFor)})
	return nil
}

// putBack returns a lock taken but not used, with its time unchanged.
func (k *keptLocks) putBack(vm string, kl keptLock) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.m[vm] = kl
}

// has tells whether vm's lock is kept idle here.
func (k *keptLocks) has(vm string) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	_, ok := k.m[vm]
	return ok
}

// expired removes and returns the locks idle past their time (all of them
// with all set).
func (k *keptLocks) expired(now time.Time, all bool) []store.Lock {
	k.mu.Lock()
	defer k.mu.Unlock()
	var out []store.Lock
	for vm, kl := range k.m {
		if all || now.After(kl.until) {
			out = append(out, kl.lock)
			delete(k.m, vm)
		}
	}
	return out
}

// releaseKeptLocks drops idle kept locks once their time is up, and all of
// them when ctx ends (the lease would take them within lockTTL anyway).
func (m *Manager) releaseKeptLocks(ctx context.Context) {
	t := time.NewTicker(keepLocksFor / 4)
	defer t.Stop()
	unlock := func(ls []store.Lock) {
		for _, l := range ls {
			uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			err := m.store.Unlock(uctx, l)
			cancel()
			if err != nil {
				select {
				case m.unreleased <- l:
				default:
				}
			}
		}
	}
	for {
		select {
		case <-ctx.Done():
			unlock(m.kept.expired(time.Now(), true))
			return
		case now := <-t.C:
			unlock(m.kept.expired(now, false))
		}
	}
}
