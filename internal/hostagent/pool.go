package hostagent

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vigil-project/vigil/internal/atomicfile"
	"github.com/vigil-project/vigil/internal/hostproto"
	"github.com/vigil-project/vigil/internal/qemu"
	"golang.org/x/sys/unix"
)

// poolIDFile names a pool: every host that mounts the same directory reads
// the same id, which is how the manager knows which hosts can take a VM.
const poolIDFile = "pool-id"

// openPool makes sure dir is a storage pool and returns its id; the first
// host to use a directory names it.
func openPool(dir string) (string, error) {
	if err := os.MkdirAll(filepath.Join(dir, "vms"), 0o755); err != nil {
		return "", fmt.Errorf("storage pool %s: %w", dir, err)
	}
	path := filepath.Join(dir, poolIDFile)
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		var id [8]byte
		rand.Read(id[:])
		tmp := path + ".new-" + hex.EncodeToString(id[:])
		if err := atomicfile.WriteFile(tmp, []byte("pool-"+hex.EncodeToString(id[:])+"\n"), 0o644); err != nil {
			return "", fmt.Errorf("storage pool %s: %w", dir, err)
		}
		// Link fails if another host named the pool first; then its name wins.
		if err := os.Link(tmp, path); err != nil && !errors.Is(err, os.ErrExist) {
			os.Remove(tmp)
			return "", fmt.Errorf("storage pool %s: %w", dir, err)
		}
		os.Remove(tmp)
		b, err = os.ReadFile(path)
	}
	if err != nil {
		return "", fmt.Errorf("storage pool %s: %w", dir, err)
	}
	id := strings.TrimSpace(string(b))
	if id == "" {
		return "", fmt.Errorf("storage pool %s: %s is empty: remove it and restart the host agent", dir, path)
	}
	return id, nil
}

// owner is the lease on a VM's files in the pool (owner.json next to the
// disk): the host that may run it, and the epoch of that grant.
type owner struct {
	Host  string    `json:"host"`
	Epoch int64     `json:"epoch"`
	Since time.Time `json:"since"`
	CRC   uint32    `json:"crc"` // of host and epoch, against torn or edited files
}

func (o owner) sum() uint32 {
	return crc32.Checksum(fmt.Appendf(nil, "%s\x00%d", o.Host, o.Epoch), crc32.MakeTable(crc32.Castagnoli))
}

func (v *vm) ownerFile() string { return filepath.Join(v.storeDir, "owner.json") }

func (v *vm) readOwner() (owner, error) {
	var o owner
	b, err := os.ReadFile(v.ownerFile())
	if err != nil {
		return o, err
	}
	if err := json.Unmarshal(b, &o); err != nil {
		return o, fmt.Errorf("owner file %s: %w", v.ownerFile(), err)
	}
	if o.CRC != o.sum() {
		return o, fmt.Errorf("owner file %s fails its checksum", v.ownerFile())
	}
	return o, nil
}

// claim takes the lease with epoch, refusing if another host already holds
// this epoch or a later one (two managers handing the VM out at once).
func (v *vm) claim(epoch int64) error {
	if o, err := v.readOwner(); err == nil && (o.Epoch > epoch || o.Epoch == epoch && o.Host != v.agent.cfg.Name) {
		return fmt.Errorf("%s: %w: host %s holds epoch %d (this host was given %d)", v.spec.Name, ErrNotOwner, o.Host, o.Epoch, epoch)
	}
	return v.writeOwner(epoch)
}

func (v *vm) writeOwner(epoch int64) error {
	o := owner{Host: v.agent.cfg.Name, Epoch: epoch, Since: time.Now().UTC()}
	o.CRC = o.sum()
	b, _ := json.MarshalIndent(o, "", "  ")
	return atomicfile.WriteFile(v.ownerFile(), b, 0o644)
}

// pooled tells whether the VM's files live in a shared pool.
func (v *vm) pooled() bool { return v.spec.Pool != "" }

// checkOwner refuses to run a pooled VM this host does not hold the lease
// of. Local VMs are always this host's.
func (v *vm) checkOwner() error {
	if !v.pooled() {
		return nil
	}
	o, err := v.readOwner()
	if err != nil {
		return fmt.Errorf("%s: %w: %w", v.spec.Name, ErrNotOwner, err)
	}
	if o.Host != v.agent.cfg.Name || o.Epoch != v.spec.Epoch {
		return fmt.Errorf("%s: %w: the pool gives it to host %s (epoch %d), this host has epoch %d", v.spec.Name, ErrNotOwner, o.Host, o.Epoch, v.spec.Epoch)
	}
	return nil
}

// launch starts QEMU for m once this host holds the VM's lease and no other
// QEMU has its disk open. An incoming live migration skips both: its QEMU
// opens the disk inactive, and the lease changes hands when it completes.
func (v *vm) launch(ctx context.Context, m qemu.Machine, migrating bool) (*qemu.Process, error) {
	if err := v.mayLaunch(m, migrating); err != nil {
		return nil, err
	}
	if !migrating {
		// A new run: the checkpoints of an earlier one must not be
		// resumable (an activation applies its checkpoint's disk
		// snapshot before it launches, so it loses nothing here).
		if err := v.dropCheckpointSnapshotsOffline(ctx); err != nil {
			return nil, fmt.Errorf("start %s: %w", v.spec.Name, err)
		}
	}
	if err := v.prepareBoot(ctx); err != nil {
		return nil, err
	}
	return qemu.Start(ctx, v.agent.qemuBin, m)
}

// mayLaunch refuses a launch this host must not do (see launch).
func (v *vm) mayLaunch(m qemu.Machine, migrating bool) error {
	if v.pooled() {
		if err := v.agent.refuseIfCutOff("start " + v.spec.Name); err != nil {
			return err
		}
	}
	if !migrating {
		if err := v.checkOwner(); err != nil {
			return err
		}
		// A QEMU just killed (a restart, a revert) can hold its locks for
		// a moment after its main thread is gone, until its last thread
		// exits: give it that moment before calling the disk taken.
		inUse, err := qemu.DiskInUse(m.Disk)
		for deadline := time.Now().Add(2 * time.Second); err == nil && inUse && time.Now().Before(deadline); {
			time.Sleep(20 * time.Millisecond)
			inUse, err = qemu.DiskInUse(m.Disk)
		}
		if err != nil {
			return err
		}
		if inUse {
			return fmt.Errorf("%s: %w (%s): an old copy may still run on a host that lost contact; it ends when that host fences itself", v.spec.Name, ErrDiskInUse, m.Disk)
		}
	}
	return nil
}

// Attach takes over a pooled VM whose disk another host made: it records
// the spec here and writes the owner file with spec.Epoch, which from then
// on keeps any older owner from starting it. Nothing is started.
func (a *Agent) Attach(ctx context.Context, spec hostproto.VMSpec) (hostproto.None, error) {
	if err := checkName("vm", spec.Name); err != nil {
		return none(err)
	}
	if spec.Pool == "" {
		return none(fmt.Errorf("attach %s: its disk is local to another host and cannot be reached from here", spec.Name))
	}
	if spec.Pool != a.poolID {
		return none(fmt.Errorf("attach %s: %w (it is in %s, this host has %q)", spec.Name, ErrWrongPool, spec.Pool, a.poolID))
	}
	if err := a.refuseIfCutOff("attach " + spec.Name); err != nil {
		return none(err)
	}
	a.mu.Lock()
	old, ok := a.vms[spec.Name]
	a.mu.Unlock()
	if ok {
		if _, _, err := old.running(); err == nil {
			return none(fmt.Errorf("attach %s: %w", spec.Name, ErrRunning))
		}
	}
	v := a.newVM(spec)
	if _, err := os.Stat(v.machine.Disk); err != nil {
		return none(fmt.Errorf("attach %s: its disk is missing from the pool: %w", spec.Name, err))
	}
	if o, err := v.readOwner(); err == nil && (o.Epoch > spec.Epoch || o.Epoch == spec.Epoch && o.Host != a.cfg.Name) {
		return none(fmt.Errorf("attach %s: %w: host %s holds epoch %d (this host was given %d)", spec.Name, ErrNotOwner, o.Host, o.Epoch, spec.Epoch))
	}
	if err := os.MkdirAll(v.machine.Dir, 0o755); err != nil {
		return none(fmt.Errorf("attach %s: %w", spec.Name, err))
	}
	if err := v.writeSpec(); err != nil {
		return none(fmt.Errorf("attach %s: %w", spec.Name, err))
	}
	if err := v.claim(spec.Epoch); err != nil {
		return none(fmt.Errorf("attach %s: %w", spec.Name, err))
	}
	a.mu.Lock()
	a.vms[spec.Name] = v
	a.mu.Unlock()
	v.log.Info("attached vm from the storage pool", "epoch", spec.Epoch)
	return hostproto.None{}, nil
}

func (v *vm) writeSpec() error {
	v.mu.Lock()
	b, _ := json.MarshalIndent(v.spec, "", "  ")
	v.mu.Unlock()
	return atomicfile.WriteFile(filepath.Join(v.machine.Dir, "spec.json"), b, 0o644)
}

// SetCutOff records whether this host has lost every manager. While it is
// cut off it starts no pooled VM (start, attach, incoming migration): the
// managers may be giving those VMs to other hosts.
func (a *Agent) SetCutOff(b bool) { a.cutOff.Store(b) }

func (a *Agent) refuseIfCutOff(what string) error {
	if a.cutOff.Load() {
		return fmt.Errorf("%s: %w: it fenced its pooled vms and starts none until a manager hears from it again", what, ErrCutOff)
	}
	return nil
}

// Fence kills every pooled VM on this host, at once. A host that lost
// every manager does it before the managers may restart those VMs
// elsewhere, so a VM never runs twice. VMs on local storage are left
// running: no other host can start them, so killing them would protect
// nothing and only turn a manager outage into a VM outage.
func (a *Agent) Fence(reason string) int {
	a.mu.Lock()
	vms := make([]*vm, 0, len(a.vms))
	for _, v := range a.vms {
		if v.pooled() {
			vms = append(vms, v)
		}
	}
	a.mu.Unlock()
	// All at once: one slow kill must not delay the others past the
	// moment the managers may restart them elsewhere. No opMu: an
	// operation in progress must not delay a fence either.
	var wg sync.WaitGroup
	var n atomic.Int32
	for _, v := range vms {
		v.mu.Lock()
		p := v.proc
		if p != nil {
			v.fencing = reason
			v.stopping = true
		}
		v.mu.Unlock()
		if p == nil {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if err := p.Kill(ctx); err != nil {
				v.log.Error("fence: kill qemu", "pid", p.PID, "err", err)
				return
			}
			n.Add(1)
			v.log.Warn("fenced: qemu killed", "pid", p.PID, "reason", reason)
		}()
	}
	wg.Wait()
	return int(n.Load())
}

// Sweep lets go of pooled VMs that another host owns now (a failover or a
// migration happened while this host was away, or the VM was deleted):
// a copy still running is killed, and the local entry goes. The VM's files
// in the pool are not touched.
func (a *Agent) Sweep() {
	// A pool that is not mounted (or another one) would make every VM look
	// deleted: sweep only while the pool is the one this host joined.
	if id, err := os.ReadFile(filepath.Join(a.cfg.StoragePool, poolIDFile)); err != nil || strings.TrimSpace(string(id)) != a.poolID {
		if a.poolID != "" {
			a.log.Warn("storage pool not readable or not ours: not sweeping", "pool", a.cfg.StoragePool, "err", err)
		}
		return
	}
	a.mu.Lock()
	vms := make([]*vm, 0, len(a.vms))
	for _, v := range a.vms {
		v.mu.Lock()
		skip := v.creating || v.incoming || !v.pooled()
		v.mu.Unlock()
		if !skip {
			vms = append(vms, v)
		}
	}
	a.mu.Unlock()
	for _, v := range vms {
		stale, why := v.stale()
		if !stale {
			continue
		}
		unlock := v.lockOp("sweep")
		if p, _, err := v.running(); err == nil {
			v.mu.Lock()
			v.fencing = why
			v.mu.Unlock()
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			v.killLocked(ctx, p)
			cancel()
		}
		a.dropLocal(v)
		unlock()
		v.log.Warn("dropped a vm another host owns now", "why", why)
		a.notify(v.spec.Name, hostproto.EventDropped, true, why)
	}
}

// stale tells whether the pool says the VM is no longer this host's.
func (v *vm) stale() (bool, string) {
	if _, err := os.Stat(v.storeDir); errors.Is(err, os.ErrNotExist) {
		return true, "its files are gone from the pool (deleted)"
	}
	o, err := v.readOwner()
	if err != nil {
		return false, "" // unreadable: keep it, launch refuses to start it anyway
	}
	v.mu.Lock()
	epoch := v.spec.Epoch
	v.mu.Unlock()
	if o.Epoch > epoch || (o.Epoch == epoch && o.Host != v.agent.cfg.Name) {
		return true, fmt.Sprintf("host %s owns it now (epoch %d; this host had %d)", o.Host, o.Epoch, epoch)
	}
	return false, ""
}

// Whether the pool's file system shares locks across hosts. The lease on a
// pooled VM and the refusal to start a VM whose disk is in use rest on
// seeing another host's locks (QEMU's image locks, our F_OFD_GETLK probe).
// That holds on one machine, NFSv4 and CephFS, not on NFSv3 without lockd
// or on some FUSE file systems, where two hosts could run one VM and
// corrupt its disk. So each host holds a lock on a file of its own in the
// pool, POOL/hosts/NAME.lock, keeps its mtime fresh, and looks for the
// locks of the other hosts whose files are fresh.

// Verdicts of PoolLocks.
const (
	PoolLocksShared    = "shared"     // another live host's lock is seen here
	PoolLocksNotShared = "not-shared" // another live host's lock is not
	PoolLocksUnknown   = "unknown"    // no other live host seen yet
)

const (
	hostLockTouchEvery = 10 * time.Second
	hostLockProbeEvery = 30 * time.Second
	// hostLockFresh is the age under which a host's lock file counts as
	// its host's being alive: over two touches.
	hostLockFresh = 25 * time.Second
)

// PoolLocks tells whether this host sees the locks other hosts hold in the
// storage pool: PoolLocksShared, PoolLocksNotShared or PoolLocksUnknown; ""
// when the host has no storage pool.
func (a *Agent) PoolLocks() string {
	if a.poolID == "" {
		return ""
	}
	if lc := a.poolLocks.Load(); lc != nil {
		return lc.verdict()
	}
	return PoolLocksUnknown
}

// lockCheck holds this host's lock file in the pool and checks the others'.
type lockCheck struct {
	dir, name string
	log       *slog.Logger
	now       func() time.Time
	// probe tells whether a lock is held on path by anyone else; a fake in
	// tests plays a file system that does not share locks.
	probe func(path string) (bool, error)

	mu   sync.Mutex
	f    *os.File // this host's lock file, locked; nil until hold succeeds
	held string   // verdict
	// unseen holds the mtime of each fresh file of another host whose lock
	// was not seen at the last check. One such look proves nothing (its
	// host may have just died, taking its lock along); the same file
	// touched again since, with still no lock seen, does.
	unseen map[string]time.Time
}

func newLockCheck(dir, name string, log *slog.Logger) *lockCheck {
	return &lockCheck{dir: dir, name: name, log: log, now: time.Now, probe: lockHeld,
		held: PoolLocksUnknown, unseen: map[string]time.Time{}}
}

func (lc *lockCheck) path() string { return filepath.Join(lc.dir, lc.name+".lock") }

// hold takes the OFD write lock on this host's file, for as long as the
// agent runs (release), and touches it.
func (lc *lockCheck) hold() error {
	lc.mu.Lock()
	defer lc.mu.Unlock()
	if lc.f != nil {
		return nil
	}
	if err := os.MkdirAll(lc.dir, 0o755); err != nil {
		return fmt.Errorf("host lock in the storage pool: %w", err)
	}
	f, err := os.OpenFile(lc.path(), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return fmt.Errorf("host lock in the storage pool: %w", err)
	}
	lk := unix.Flock_t{Type: unix.F_WRLCK}
	if err := unix.FcntlFlock(f.Fd(), unix.F_OFD_SETLK, &lk); err != nil {
		f.Close()
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EACCES) {
			return fmt.Errorf("host lock %s is held by another process: is another host agent named %s using this pool?", lc.path(), lc.name)
		}
		return fmt.Errorf("lock %s: %w", lc.path(), err)
	}
	lc.f = f
	now := lc.now()
	os.Chtimes(lc.path(), now, now)
	return nil
}

// touch tells the other hosts this one is alive.
func (lc *lockCheck) touch() error {
	lc.mu.Lock()
	held := lc.f != nil
	lc.mu.Unlock()
	if !held {
		return lc.hold() // the pool was not reachable, or the name was taken
	}
	now := lc.now()
	if err := os.Chtimes(lc.path(), now, now); err != nil {
		return fmt.Errorf("touch host lock: %w", err)
	}
	return nil
}

// release lets go of the lock and removes the file, so the other hosts
// stop looking for this one at once.
func (lc *lockCheck) release() {
	lc.mu.Lock()
	defer lc.mu.Unlock()
	if lc.f == nil {
		return
	}
	os.Remove(lc.path())
	lc.f.Close()
	lc.f = nil
}

func (lc *lockCheck) verdict() string {
	lc.mu.Lock()
	defer lc.mu.Unlock()
	return lc.held
}

// check looks at the lock files of the other hosts and updates the
// verdict. Without evidence either way (no other live host) it keeps the
// last one: the file system does not change under a running agent.
func (lc *lockCheck) check() {
	paths, err := filepath.Glob(filepath.Join(lc.dir, "*.lock"))
	if err != nil {
		return
	}
	now := lc.now()
	lc.mu.Lock()
	prev := lc.unseen
	lc.mu.Unlock()
	var seen, unseen []string // hosts whose lock is seen, and is not
	next := map[string]time.Time{}
	for _, p := range paths {
		if p == lc.path() {
			continue
		}
		fi, err := os.Stat(p)
		if err != nil || now.Sub(fi.ModTime()) >= hostLockFresh {
			continue // gone, or its host is not running
		}
		held, err := lc.probe(p)
		if err != nil {
			lc.log.Warn("probe another host's lock in the storage pool", "file", p, "err", err)
			continue
		}
		host := strings.TrimSuffix(filepath.Base(p), ".lock")
		switch last, ok := prev[p]; {
		case held:
			seen = append(seen, host)
		case ok && fi.ModTime().After(last):
			unseen = append(unseen, host)
		default:
			next[p] = fi.ModTime()
		}
	}
	lc.mu.Lock()
	lc.unseen = next
	was := lc.held
	switch {
	case len(unseen) > 0:
		lc.held = PoolLocksNotShared
	case len(seen) > 0:
		lc.held = PoolLocksShared
	}
	is := lc.held
	lc.mu.Unlock()
	if is == was {
		return
	}
	pool := filepath.Dir(lc.dir)
	switch is {
	case PoolLocksNotShared:
		lc.log.Error("the storage pool does not share file locks between hosts: live hosts hold locks this host cannot see. "+
			"Vigil relies on them to keep two hosts from running the same pooled VM and corrupting its disk. "+
			"Mount the pool with NFSv4 or CephFS (not NFSv3 without lockd, nor a FUSE file system without POSIX locks)",
			"pool", pool, "hosts_with_unseen_locks", unseen)
	case PoolLocksShared:
		lc.log.Info("the storage pool shares file locks between hosts", "pool", pool, "hosts_seen", seen)
	}
}

// lockHeld tells whether anyone else holds a lock on path, without taking
// one.
func lockHeld(path string) (bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return false, err
	}
	defer f.Close()
	lk := unix.Flock_t{Type: unix.F_WRLCK}
	if err := unix.FcntlFlock(f.Fd(), unix.F_OFD_GETLK, &lk); err != nil {
		return false, fmt.Errorf("probe lock of %s: %w", path, err)
	}
	return lk.Type != unix.F_UNLCK, nil
}

// watchPool runs while the agent does with a storage pool: it sweeps VMs
// other hosts own now, and keeps the host lock and its verdict.
func (a *Agent) watchPool(ctx context.Context) {
	lc := newLockCheck(filepath.Join(a.cfg.StoragePool, "hosts"), a.cfg.Name, a.log)
	if err := lc.hold(); err != nil {
		a.log.Error("cannot check whether the storage pool shares locks", "err", err)
	}
	defer lc.release()
	lc.check()
	a.poolLocks.Store(lc)
	sweep := time.NewTicker(time.Second)
	defer sweep.Stop()
	touch := time.NewTicker(hostLockTouchEvery)
	defer touch.Stop()
	probe := time.NewTicker(hostLockProbeEvery)
	defer probe.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-sweep.C:
			a.Sweep()
		case <-touch.C:
			if err := lc.touch(); err != nil {
				a.log.Warn("keep the host lock in the storage pool", "err", err)
			}
		case <-probe.C:
			lc.check()
		}
	}
}
