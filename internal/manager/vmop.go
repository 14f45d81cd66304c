package manager

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/store"
)

// Operations on one VM are exclusive across every manager. An operation
// takes the VM's lock — a key bound to this manager's etcd lease — in the
// same transaction that writes its intent into the VM's record, and every
// write it makes afterwards checks the lock is still its own. If the
// manager dies, etcd drops the lock with the lease; the intent stays in the
// record, and the next pass of the leading manager finishes or rolls back
// what was left (recoverOrphan).

// Kinds of operations, as recorded in a VM's intent.
const (
	opCreate    = "create"
	opStart     = "start"
	opStop      = "stop"
	opRestart   = "restart"
	opDelete    = "delete"
	opPause     = "pause"
	opResume    = "resume"
	opSuspend   = "suspend"
	opSnapshot  = "snapshot"
	opRevert    = "revert"
	opSnapDel   = "snapshot-delete"
	opMigrate   = "migrate"
	opMove      = "move" // a cold move (attach elsewhere)
	opPolicy    = "policy"
	opConfigure = "configure"
	opRecover   = "recover"   // crash recovery (an incident, a restart)
	opFailover  = "failover"  // moving off a dead host, starting there
	opProtect   = "protect"   // protect, unprotect, a new standby
	opSettle    = "reconcile" // the reconciler bringing the record in line
	opEvent     = "event"     // recording what a host reported
)

// opIntent is an operation in progress, kept in the VM's record while it
// runs, so that a manager taking over after a crash knows what was under way.
type opIntent struct {
	Kind     string      `json:"kind"`
	Manager  string      `json:"manager"`
	Instance string      `json:"instance"`
	Started  time.Time   `json:"started"`
	From     api.VMState `json:"from"` // the state before the operation
	// Kind-specific: a migration's destination and the epoch it gives the
	// VM there; a snapshot's name.
	Target   string `json:"target,omitempty"`
	Epoch    int64  `json:"epoch,omitempty"`
	Snapshot string `json:"snapshot,omitempty"`
}

func lockKey(vm string) string { return "locks/vms/" + vm }

// newLock is the lock of one operation: its value is unique (an operation
// id), so a stale release can never drop a later operation's lock held
// with the same lease.
func (m *Manager) newLock(vm, kind string, lease store.Lease) store.Lock {
	return store.Lock{Key: lockKey(vm), Lease: lease,
		Value: fmt.Sprintf("%s %s by manager %s, op %s", kind, time.Now().UTC().Format(time.RFC3339), m.name, randomHex(6))}
}

// locker holds this manager's etcd session, whose lease the VM locks use.
type locker struct {
	cli *clientv3.Client
	ttl int // seconds

	mu     sync.Mutex
	sess   *concurrency.Session
	closed bool
}

// lockTTL is how long a dead manager's locks outlive it.
const lockTTL = 5

func (l *locker) lease(ctx context.Context) (store.Lease, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return 0, errors.New("the manager is shutting down")
	}
	if l.sess != nil {
		select {
		case <-l.sess.Done():
			l.sess = nil // expired (a partition): take a new one
		default:
			return l.sess.Lease(), nil
		}
	}
	s, err := concurrency.NewSession(l.cli, concurrency.WithTTL(l.ttl), concurrency.WithContext(context.WithoutCancel(ctx)))
	if err != nil {
		return 0, err
	}
	l.sess = s
	return s.Lease(), nil
}

// expired drops the session of lease, which etcd says it no longer has,
// before the session's keep-alive has noticed (an etcd stalled longer than
// the lease's TTL): the next lease is a new session's.
func (l *locker) expired(lease store.Lease) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.sess != nil && l.sess.Lease() == lease {
		l.sess.Orphan() // nothing left to keep alive or revoke
		l.sess = nil
	}
}

func (l *locker) close() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.closed = true
	if l.sess != nil {
		l.sess.Close()
		l.sess = nil
	}
}

// vmOp is an operation in progress on one VM: its record as last written,
// and this manager's hold on the VM's lock. Every change of the record goes
// through it (save, transition, finish), so that no write lands without the
// lock and no state change goes unchecked or unpublished.
type vmOp struct {
	m    *Manager
	r    record
	rev  int64
	lock store.Lock
	// orphan is the intent of an operation a dead manager left, when this
	// operation recovers it.
	orphan *opIntent
	// intent holds what prepare records of the operation beyond its kind
	// (a migration's target, a snapshot's name).
	intent opIntent
	// events wait for the next successful write.
	events []api.Event
	// also are other keys the next write stores with the record, or not
	// at all (an incident the operation opens).
	also     []store.Also
	released bool
	// keepIntent makes the release keep the intent in the record (the
	// operation could not be finished or rolled back: the reconciler must
	// try again).
	keepIntent bool
	// quick marks, from prepare, an operation whose outcome the host's
	// status shows by itself (pause or resume in memory): on a kept lock it
	// records no intent, and once it has ended well the lock is kept
	// (keptlock.go).
	quick bool
	// overlap is set by begin on a quick operation under a kept lock: its
	// outcome is written while the host acts (finishQuick).
	overlap bool
	// abandoned is set when end releases what finish or release did not:
	// the operation failed, and its call's audit entry must say so.
	abandoned bool
}

// begin takes the VM's lock for an operation of kind. prepare (may be nil)
// sees the record first: it refuses with an error (nothing is written and
// no lock taken) or changes the record, typically with o.set, and the
// change is written with the lock.
func (m *Manager) begin(ctx context.Context, name, kind string, prepare func(o *vmOp) error) (*vmOp, error) {
	lease, err := m.locks.lease(ctx)
	if err != nil {
		return nil, wrapf(ErrUnavailable, err, "lock vm %s", name)
	}
	// An idle lock another manager keeps goes within keepLocksFor: an
	// operation a user asked for waits for it. The controllers (settling,
	// host events) come back to the VM anyway, so they need not wait.
	waitKept := time.Now().Add(2*keepLocksFor + time.Second)
	if kind == opSettle || kind == opEvent {
		waitKept = time.Time{}
	}
	renewed := false
	for conflicts := 0; ; {
		var r record
		var rev int64
		kl, kept := m.kept.take(name, lease)
		lock := kl.lock
		if kept {
			// Nobody else writes the record while the lock is ours: the
			// record this manager last wrote under it is current. Every
			// write still checks the lock and the revision.
			if r, rev, err = kl.load(); err != nil {
				// No copy: read it, and check in the same read-only
				// transaction that the lock still is ours.
				rev, err = m.store.GetLocked(ctx, vmKey(name), lock, &r)
				switch {
				case errors.Is(err, store.ErrLockLost):
					kept = false // gone with an expired lease: start afresh
				case errors.Is(err, store.ErrNotFound):
					select { // a lock left over a deleted record: drop it
					case m.unreleased <- lock:
					default:
					}
					return nil, errorf(ErrNotFound, "vm %s does not exist: see 'vigil vm list'", name)
				case err != nil:
					m.kept.putBack(name, kl)
					return nil, wrapf(ErrUnavailable, err, "read vm %s", name)
				}
			}
		}
		if !kept {
			if r, rev, err = m.load(ctx, name); err != nil {
				return nil, err
			}
			lock = m.newLock(name, kind, lease)
		}
		// giveBack returns a kept lock this attempt does not use, idle for
		// no longer than it was going to be; after a failed write, without
		// its copy of the record (the write may have landed).
		giveBack := func(wrote bool) {
			if kept {
				if wrote {
					kl.record = nil
				}
				m.kept.putBack(name, kl)
			}
		}
		o := &vmOp{m: m, r: r, rev: rev, lock: lock}
		if r.Op != nil {
			// Only the reconciler takes over a VM with an intent left in its
			// record (and only once nobody holds its lock): it settles it.
			if kind != opSettle {
				giveBack(false)
				return nil, m.busy(ctx, name, r.Op)
			}
			o.orphan = r.Op
		}
		from := r.State
		if o.orphan != nil {
			from = o.orphan.From
		}
		if prepare != nil {
			if err := prepare(o); err != nil {
				giveBack(false)
				return nil, err
			}
		}
		if kept && o.quick && o.orphan == nil {
			// The lock is already ours, and the host will show what became
			// of the operation: no intent to write, and the outcome may be
			// written while the host acts.
			o.overlap = true
			return o, nil
		}
		in := o.intent
		if o.orphan != nil {
			// Settling keeps what the orphan was doing: if this manager dies
			// too, the next one still knows.
			in = *o.orphan
		}
		if in.Kind == "" {
			in.Kind = kind
		}
		in.Manager, in.Instance, in.Started, in.From = m.name, m.instance, time.Now().UTC(), from
		o.r.Op = &in
		if kept {
			o.rev, err = m.store.UpdateLocked(ctx, vmKey(name), rev, o.r, o.lock, false)
			if errors.Is(err, store.ErrLockLost) {
				continue // gone with an old session: take the lock afresh
			}
		} else {
			o.rev, err = m.store.Acquire(ctx, vmKey(name), rev, o.r, o.lock)
		}
		switch {
		case errors.Is(err, rpctypes.ErrLeaseNotFound) && !renewed:
			// Nothing was written: take a new session's lease, once.
			giveBack(false)
			m.locks.expired(lease)
			if lease, err = m.locks.lease(ctx); err != nil {
				return nil, wrapf(ErrUnavailable, err, "lock vm %s", name)
			}
			renewed = true
			continue
		case errors.Is(err, store.ErrLocked) && r.Op == nil && time.Now().Before(waitKept):
			// Held with no intent: kept idle by another manager, or a quick
			// operation of its own. Either ends in a moment.
			if err := m.awaitUnlocked(ctx, name, waitKept); err != nil {
				return nil, err
			}
			continue
		case errors.Is(err, store.ErrLocked):
			return nil, errorf(ErrBusy, "vm %s is busy with another operation: retry when it is done", name)
		case errors.Is(err, store.ErrConflict) && conflicts < 5:
			giveBack(true)
			conflicts++
			continue // the record changed between the read and the lock: read again
		case err != nil:
			giveBack(true)
			return nil, wrapf(ErrUnavailable, err, "lock vm %s", name)
		}
		o.flush()
		return o, nil
	}
}

// awaitUnlocked waits, reading only, until vm's lock is free or kept idle
// by this manager, or until deadline.
func (m *Manager) awaitUnlocked(ctx context.Context, vm string, deadline time.Time) error {
	for time.Now().Before(deadline) && !m.kept.has(vm) {
		held, _, err := m.store.Held(ctx, lockKey(vm))
		if err != nil {
			return wrapf(ErrUnavailable, err, "lock vm %s", vm)
		}
		if !held {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	return nil
}

// beginWait is begin, waiting up to a minute for an operation in progress
// to end instead of refusing at once (for a drain, which goes through many
// VMs and should not give up on one busy for a moment).
func (m *Manager) beginWait(ctx context.Context, name, kind string, prepare func(o *vmOp) error) (*vmOp, error) {
	deadline := time.Now().Add(time.Minute)
	for {
		o, err := m.begin(ctx, name, kind, prepare)
		if !errors.Is(err, ErrBusy) || time.Now().After(deadline) {
			return o, err
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// beginNew writes the record of a new VM and takes its lock, in one
// transaction: the name must be free.
func (m *Manager) beginNew(ctx context.Context, r record, kind string, claims map[string]string) (*vmOp, error) {
	name := r.Spec.Name
	var o *vmOp
	var err error
	for attempt := 0; attempt < 2; attempt++ {
		lease, lerr := m.locks.lease(ctx)
		if lerr != nil {
			return nil, wrapf(ErrUnavailable, lerr, "lock vm %s", name)
		}
		o = &vmOp{m: m, r: r, lock: m.newLock(name, kind, lease)}
		o.r.Op = &opIntent{Kind: kind, Manager: m.name, Instance: m.instance, Started: time.Now().UTC(), From: r.State}
		o.rev, err = m.store.AcquireClaiming(ctx, vmKey(name), 0, o.r, o.lock, claims)
		if !errors.Is(err, rpctypes.ErrLeaseNotFound) {
			break
		}
		// Nothing was written: a new session's lease, once.
		m.locks.expired(lease)
	}
	var ce *store.ClaimError
	switch {
	case errors.As(err, &ce):
		return nil, errorf(ErrConflict, "vm %s: %s was taken by vm %s meanwhile: retry", name, strings.TrimSuffix(ce.Key, "/"), ce.Holder)
	case errors.Is(err, store.ErrLocked), errors.Is(err, store.ErrConflict):
		return nil, errorf(ErrConflict, "vm %s already exists: pick another name, or delete it first", name)
	case err != nil:
		return nil, wrapf(ErrUnavailable, err, "create vm %s", name)
	}
	return o, nil
}

// detach gives an operation that has begun a context of its own: once a
// host has been asked to act, the outcome must be recorded even if the
// client goes away (the host finishes what it was asked anyway).
func detach(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), opTimeout)
}

// opTimeout bounds an operation that has begun (each host call has its own,
// shorter, limit).
const opTimeout = 15 * time.Minute

// busy explains why a VM with an intent in its record cannot be acted on.
func (m *Manager) busy(ctx context.Context, name string, op *opIntent) error {
	if held, _, err := m.store.Held(ctx, lockKey(name)); err == nil && !held {
		m.queue.Add(name) // an orphan: let the reconciler see it soon
		return errorf(ErrBusy, "vm %s has an unfinished %s left by manager %s, which stopped; the leading manager completes or rolls it back within seconds: retry then",
			name, op.Kind, op.Manager)
	}
	return errorf(ErrBusy, "vm %s is busy with %s (started %s by manager %s): retry when it is done",
		name, op.Kind, op.Started.Format(time.RFC3339), op.Manager)
}

// set moves the record to state to with msg, if the lifecycle allows it;
// the change is written (and published) by the next save.
func (o *vmOp) set(to api.VMState, msg string) error {
	from := o.r.State
	if from == to && o.r.Message == msg {
		return nil
	}
	if err := checkTransition(from, to); err != nil {
		o.m.log.Error("refused a state change the lifecycle does not allow", "vm", o.r.Spec.Name, "from", from, "to", to, "err", err)
		return fmt.Errorf("vm %s: %w", o.r.Spec.Name, err)
	}
	o.r.State, o.r.Message = to, msg
	o.events = append(o.events, api.Event{Type: "vm.state", VM: o.r.Spec.Name, Host: o.r.Host, State: to, Message: msg})
	return nil
}

// publish queues an event for after the next successful write.
func (o *vmOp) publish(e api.Event) { o.events = append(o.events, e) }

// save writes the record under the lock and publishes what waited for it.
func (o *vmOp) save(ctx context.Context) error {
	return o.write(ctx, false)
}

// transition is set then save.
func (o *vmOp) transition(ctx context.Context, to api.VMState, msg string) error {
	if err := o.set(to, msg); err != nil {
		return err
	}
	return o.save(ctx)
}

// release ends the operation without a change of state.
func (o *vmOp) release(ctx context.Context) error {
	return o.write(ctx, true)
}

// finish is the operation's last write: the outcome, with the intent
// cleared and the lock released in the same transaction.
func (o *vmOp) finish(ctx context.Context, to api.VMState, msg string) error {
	if err := o.set(to, msg); err != nil {
		// The host may have acted: leave the intent for the reconciler.
		o.keepIntent = true
		o.end(ctx)
		return err
	}
	return o.write(ctx, true)
}

// end releases the lock (clearing the intent) if finish has not; deferred
// by every operation, so an error path cannot leave the VM locked. Its
// write does not depend on the caller's context: an operation abandoned by
// its client still ends.
func (o *vmOp) end(ctx context.Context) {
	if o.released {
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	o.abandoned = true
	if err := o.write(ctx, true); err != nil {
		// The janitor keeps trying; the lock goes with this manager's
		// lease at the latest. The intent left in the record makes the
		// leader settle the VM.
		o.m.log.Warn("release vm lock", "vm", o.r.Spec.Name, "err", err)
		o.released = true
		select {
		case o.m.unreleased <- o.lock:
		default:
		}
	}
}

func (o *vmOp) write(ctx context.Context, release bool) error {
	audited, keep, err := o.commit(ctx, release)
	if err != nil {
		return err
	}
	o.landed(audited, keep)
	return nil
}

// commit writes the record under the lock (releasing it with release,
// unless a quick operation keeps it). What must follow the write — the
// audit entry marked stored, the events, the kept lock — is left to
// landed: finishQuick holds it back until the host has acted too.
func (o *vmOp) commit(ctx context.Context, release bool) (audited func(), keep bool, err error) {
	r := o.r
	if release && !o.keepIntent {
		r.Op = nil
	}
	r.UpdatedAt = time.Now().UTC()
	keep = release && o.quick && !o.keepIntent && !o.abandoned
	also := o.also[:len(o.also):len(o.also)]
	if release && !o.keepIntent && !o.abandoned {
		// The outcome of an audited call on this VM: its entry lands with it.
		if e, stored, ok := auditFor(ctx, r.Spec.Name); ok {
			also, audited = append(also, store.Also{Key: o.m.auditKey(e), Value: e, TTL: auditTTL}), stored
		}
	}
	rev, err := o.m.store.UpdateLocked(ctx, vmKey(r.Spec.Name), o.rev, r, o.lock, release && !keep, also...)
	if err != nil {
		if errors.Is(err, store.ErrLockLost) {
			o.released = true
			return nil, false, wrapf(ErrUnavailable, err, "lost the lock on vm %s (this manager was cut off from the store): another manager may act on it now", r.Spec.Name)
		}
		return nil, false, wrapf(ErrUnavailable, err, "save vm %s", r.Spec.Name)
	}
	o.r, o.rev, o.also = r, rev, nil
	if release {
		o.released = true
	}
	return audited, keep, nil
}

// landed follows a write: the audit entry it carried is marked stored, the
// events it made true are published, and a quick operation's lock is kept.
func (o *vmOp) landed(audited func(), keep bool) {
	if audited != nil {
		audited()
	}
	o.flush()
	if !keep {
		return
	}
	// After the events: the next operation's come after this one's.
	if err := o.m.kept.keep(o.r.Spec.Name, o.lock, o.r, o.rev); err != nil {
		o.m.log.Warn("keep vm lock", "vm", o.r.Spec.Name, "err", err)
		select { // the lock goes now instead
		case o.m.unreleased <- o.lock:
		default:
		}
	}
}

// finishQuick makes a pause or resume in memory: act on the host, then the
// record says desired and to. A quick operation under a kept lock
// (overlap) writes its outcome while the host acts instead of after:
// nobody else acts on the VM or writes its record meanwhile, and the
// events, the kept lock and the answer wait for both. If the host fails,
// the record is put back as it was (by end, which also releases the lock);
// if the manager dies in between, the record is only out of step with the
// host's run state, which the reconciler brings in line (keptlock.go).
// Written that way, the record cannot know how long the host took: its
// last operation has no duration, and only the answer to the call has it.
func (o *vmOp) finishQuick(ctx context.Context, action, desired string, to api.VMState, act func(context.Context) error) error {
	var took time.Duration
	timed := func(ctx context.Context) error {
		t0 := time.Now()
		err := act(ctx)
		took = time.Since(t0)
		return err
	}
	before, events := o.r, len(o.events)
	o.r.Desired = desired
	if !o.overlap {
		if err := timed(ctx); err != nil {
			o.r = before
			return err
		}
		o.r.LastOperation = &api.Operation{Action: action, DurationMS: ms(took)}
		o.m.metrics.observeOp(o.r.LastOperation)
		return o.finish(ctx, to, "")
	}
	o.r.LastOperation = &api.Operation{Action: action}
	if err := o.set(to, ""); err != nil {
		o.r = before
		return err // nothing done yet: end releases the lock
	}
	acted := make(chan error, 1)
	go func() { acted <- timed(ctx) }()
	audited, keep, werr := o.commit(ctx, true)
	if aerr := <-acted; aerr != nil {
		if werr == nil && audited != nil {
			audited() // stored with the outcome: the call's answer replaces it
		}
		o.r, o.events, o.quick = before, o.events[:events], false
		o.released = o.released && werr != nil // a lost lock stays lost
		return aerr
	}
	if werr != nil {
		return fmt.Errorf("vm %s was %sd on its host, but: %w", o.r.Spec.Name, action, werr)
	}
	o.landed(audited, keep) // the lock is kept with the record as written
	o.r.LastOperation = &api.Operation{Action: action, DurationMS: ms(took)}
	o.m.metrics.observeOp(o.r.LastOperation)
	return nil
}

func (o *vmOp) flush() {
	for _, e := range o.events {
		if e.Type == "vm.state" {
			o.m.log.Info("vm state", "vm", e.VM, "state", e.State, "message", e.Message)
		}
		o.m.publish(e)
	}
	o.events = nil
}

// deleteRecord removes the VM's record, incidents and snapshots with the
// lock, and publishes vm.deleted.
func (o *vmOp) deleteRecord(ctx context.Context) error {
	name := o.r.Spec.Name
	prefixes := append([]string{"incidents/" + name + "/", "snapshots/" + name + "/"}, nicClaims(name, o.r.Spec.NICs)...)
	o.m.placeMu.Lock()
	delete(o.m.placed, name) // placement stops counting it
	o.m.placeMu.Unlock()
	if err := o.m.store.DeleteLocked(ctx, o.lock, vmKey(name), prefixes...); err != nil {
		return wrapf(ErrUnavailable, err, "delete vm %s", name)
	}
	o.released = true
	o.m.publish(api.Event{Type: "vm.deleted", VM: name, Host: o.r.Host})
	return nil
}

// step is one named step of a multi-phase operation, with its undo.
type step struct {
	name string
	do   func(ctx context.Context) error
	// undo, if set, reverses do when a later step fails.
	undo func(ctx context.Context) error
}

// run runs steps in order. When one fails, the undos of the steps done
// run in reverse order (on a context the caller cannot cancel: a half
// rolled-back operation is the worst outcome), and the error names the
// step. After each step the step hook runs (tests use it to kill the
// manager at a named point).
func (o *vmOp) run(ctx context.Context, kind string, steps []step) error {
	for i, s := range steps {
		if err := s.do(ctx); err != nil {
			uctx := context.WithoutCancel(ctx)
			for j := i - 1; j >= 0; j-- {
				if steps[j].undo == nil {
					continue
				}
				if uerr := steps[j].undo(uctx); uerr != nil {
					o.m.log.Error("undo failed", "vm", o.r.Spec.Name, "op", kind, "step", steps[j].name, "err", uerr)
				}
			}
			return fmt.Errorf("%s: %w", s.name, err)
		}
		o.m.stepHook(kind + "/" + s.name)
	}
	return nil
}
