package hostagent

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vigil-project/vigil/internal/atomicfile"
	"github.com/vigil-project/vigil/internal/hostproto"
	"github.com/vigil-project/vigil/internal/qemu"
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
	if v.pooled() {
		if err := v.agent.refuseIfCutOff("start " + v.spec.Name); err != nil {
			return nil, err
		}
	}
	if !migrating {
		if err := v.checkOwner(); err != nil {
			return nil, err
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
			return nil, err
		}
		if inUse {
			return nil, fmt.Errorf("%s: %w (%s): an old copy may still run on a host that lost contact; it ends when that host fences itself", v.spec.Name, ErrDiskInUse, m.Disk)
		}
	}
	return qemu.Start(ctx, v.agent.qemuBin, m)
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
		v.opMu.Lock()
		if p, _, err := v.running(); err == nil {
			v.mu.Lock()
			v.fencing = why
			v.mu.Unlock()
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			v.killLocked(ctx, p)
			cancel()
		}
		a.dropLocal(v)
		v.opMu.Unlock()
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
