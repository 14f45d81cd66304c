// Package bootsvc is Vigil's boot service for stateless hosts: DHCP for
// machines booting from the network, HTTP for the iPXE script and the host
// image (iPXE speaks no HTTPS here), and over TLS each admitted machine's
// configuration, signed by the cluster CA. The registry of profiles and
// machines lives in etcd, so every manager sees the same.
package bootsvc

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"regexp"
	"strings"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/hostimage"
	"github.com/vigil-project/vigil/internal/store"
)

// ErrInvalid and ErrNotFound are what callers map to 400 and 404.
var (
	ErrInvalid  = errors.New("invalid")
	ErrNotFound = errors.New("not found")
)

// Registry keeps boot profiles and machines in etcd, and finds host
// images in a directory.
type Registry struct {
	Store     *store.Store
	ImagesDir string
	Now       func() time.Time
	// MaxMachines bounds the records of machines (default MaxMachines).
	MaxMachines int
}

func (r *Registry) now() time.Time {
	if r.Now != nil {
		return r.Now().UTC()
	}
	return time.Now().UTC()
}

var nameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)

func profileKey(name string) string { return "boot/profiles/" + name }
func machineKey(mac string) string  { return "boot/machines/" + mac }

// NormalMAC is mac in lower-case colon form, or an error for a bad one.
func NormalMAC(mac string) (string, error) {
	hw, err := net.ParseMAC(mac)
	if err != nil || len(hw) != 6 {
		return "", fmt.Errorf("%w: %q is not an Ethernet address (like 52:54:00:12:34:56)", ErrInvalid, mac)
	}
	return hw.String(), nil
}

// listOf reads every record under prefix (those that do not decode are
// skipped).
func listOf[T any](ctx context.Context, st *store.Store, prefix string) ([]T, error) {
	kvs, err := st.List(ctx, prefix)
	if err != nil {
		return nil, err
	}
	out := make([]T, 0, len(kvs))
	for _, kv := range kvs {
		var v T
		if json.Unmarshal(kv.Value, &v) == nil {
			out = append(out, v)
		}
	}
	return out, nil
}

// Images lists the host images.
func (r *Registry) Images() ([]api.BootImage, error) {
	imgs, err := hostimage.List(r.ImagesDir)
	if err != nil {
		return nil, err
	}
	out := make([]api.BootImage, 0, len(imgs))
	for _, i := range imgs {
		out = append(out, api.BootImage{Digest: i.Digest, KernelVersion: i.KernelVersion, QEMUVersion: i.QEMUVersion,
			CAFingerprint: i.CAFingerprint, Bytes: i.Bytes, BuiltAt: i.BuiltAt})
	}
	return out, nil
}

// image finds a host image by digest.
func (r *Registry) image(digest string) (*hostimage.Image, error) {
	if !hostimage.ValidDigest(digest) {
		return nil, fmt.Errorf("%w: %q is not an image digest (sha256:HEX, see 'vigil boot image list')", ErrInvalid, digest)
	}
	img, err := hostimage.Load(hostimage.Path(r.ImagesDir, digest))
	if err != nil {
		return nil, fmt.Errorf("%w: host image %s is not on this manager: build it with 'vigil boot image build'", ErrNotFound, digest)
	}
	return img, nil
}

// SetProfile creates or changes a profile.
func (r *Registry) SetProfile(ctx context.Context, p api.BootProfile) (api.BootProfile, error) {
	if !nameRE.MatchString(p.Name) {
		return api.BootProfile{}, fmt.Errorf("%w: profile name %q: use lower-case letters, digits and dashes", ErrInvalid, p.Name)
	}
	if _, err := r.image(p.Image); err != nil {
		return api.BootProfile{}, err
	}
	for k := range p.Labels {
		if !nameRE.MatchString(k) {
			return api.BootProfile{}, fmt.Errorf("%w: label %q: use lower-case letters, digits and dashes", ErrInvalid, k)
		}
	}
	for {
		var old api.BootProfile
		rev, err := r.Store.Get(ctx, profileKey(p.Name), &old)
		now := r.now()
		p.UpdatedAt = now
		switch {
		case errors.Is(err, store.ErrNotFound):
			p.CreatedAt = now
			if _, err := r.Store.Create(ctx, profileKey(p.Name), p); errors.Is(err, store.ErrExists) {
				continue
			} else if err != nil {
				return api.BootProfile{}, err
			}
			return p, nil
		case err != nil:
			return api.BootProfile{}, err
		}
		p.CreatedAt = old.CreatedAt
		if _, err := r.Store.Update(ctx, profileKey(p.Name), rev, p); errors.Is(err, store.ErrConflict) {
			continue
		} else if err != nil {
			return api.BootProfile{}, err
		}
		return p, nil
	}
}

// Profile reads one profile.
func (r *Registry) Profile(ctx context.Context, name string) (api.BootProfile, error) {
	var p api.BootProfile
	if _, err := r.Store.Get(ctx, profileKey(name), &p); errors.Is(err, store.ErrNotFound) {
		return p, fmt.Errorf("%w: no boot profile %q: see 'vigil boot profile list'", ErrNotFound, name)
	} else if err != nil {
		return p, err
	}
	return p, nil
}

// Profiles lists the profiles.
func (r *Registry) Profiles(ctx context.Context) ([]api.BootProfile, error) {
	return listOf[api.BootProfile](ctx, r.Store, "boot/profiles/")
}

// Machines lists the machines seen booting.
func (r *Registry) Machines(ctx context.Context) ([]api.BootMachine, error) {
	return listOf[api.BootMachine](ctx, r.Store, "boot/machines/")
}

// Machine reads one machine.
func (r *Registry) Machine(ctx context.Context, mac string) (api.BootMachine, error) {
	mac, err := NormalMAC(mac)
	if err != nil {
		return api.BootMachine{}, err
	}
	var m api.BootMachine
	if _, err := r.Store.Get(ctx, machineKey(mac), &m); errors.Is(err, store.ErrNotFound) {
		return m, fmt.Errorf("%w: machine %s has not booted from this cluster: see 'vigil boot machines'", ErrNotFound, mac)
	} else if err != nil {
		return m, err
	}
	return m, nil
}

// update applies f to machine mac's record (made quarantined if new) and
// stores it; f returning an error leaves the record as it was.
func (r *Registry) update(ctx context.Context, mac string, f func(m *api.BootMachine) error) (api.BootMachine, error) {
	mac, err := NormalMAC(mac)
	if err != nil {
		return api.BootMachine{}, err
	}
	for {
		var m api.BootMachine
		rev, err := r.Store.Get(ctx, machineKey(mac), &m)
		isNew := errors.Is(err, store.ErrNotFound)
		if err != nil && !isNew {
			return api.BootMachine{}, err
		}
		if isNew {
			m = api.BootMachine{MAC: mac, State: api.MachineQuarantined, FirstSeen: r.now()}
		}
		if err := f(&m); err != nil {
			return api.BootMachine{}, err
		}
		if isNew {
			_, err = r.Store.Create(ctx, machineKey(mac), m)
		} else {
			_, err = r.Store.Update(ctx, machineKey(mac), rev, m)
		}
		if errors.Is(err, store.ErrExists) || errors.Is(err, store.ErrConflict) {
			continue
		}
		return m, err
	}
}

// Admit lets machine mac join as host name with profile's configuration.
// A host name is one machine's: admitting another under it is refused.
func (r *Registry) Admit(ctx context.Context, mac string, req api.BootAdmitRequest) (api.BootMachine, error) {
	if !nameRE.MatchString(req.HostName) {
		return api.BootMachine{}, fmt.Errorf("%w: host name %q: it must be a DNS label", ErrInvalid, req.HostName)
	}
	if _, err := r.Profile(ctx, req.Profile); err != nil {
		return api.BootMachine{}, err
	}
	norm, err := NormalMAC(mac)
	if err != nil {
		return api.BootMachine{}, err
	}
	m, admitted, err := r.admitAs(ctx, norm, req.HostName, func(m *api.BootMachine) bool {
		m.State, m.Profile, m.Rule, m.Held = api.MachineAdmitted, req.Profile, "", false
		return true
	})
	if err != nil {
		return api.BootMachine{}, err
	}
	if !admitted {
		return api.BootMachine{}, fmt.Errorf("%w: host name %s is taken (by another machine, or by a host that did not boot from the network): pick another name", ErrInvalid, req.HostName)
	}
	return m, nil
}

// Quarantine takes a machine's admission back, and holds it: no rule
// admits it again, only an operator.
func (r *Registry) Quarantine(ctx context.Context, mac string) (api.BootMachine, error) {
	if _, err := r.Machine(ctx, mac); err != nil {
		return api.BootMachine{}, err
	}
	return r.update(ctx, mac, func(m *api.BootMachine) error {
		m.State, m.Held = api.MachineQuarantined, true
		return nil
	})
}

// MaxMachines bounds the machine records anyone on the boot network can
// make by booting (or by claiming to): past it, unknown machines are not
// recorded until some are forgotten.
const MaxMachines = 4096

// ErrFull is the registry refusing a new machine record.
var ErrFull = errors.New("too many machines")

var uuidRE = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$`)

// seenEvery is how often a machine's last-seen time is written when
// nothing else about it changed (a quarantined machine asks every 3 s).
const seenEvery = 30 * time.Second

// Claims are what a machine says of itself when it asks for something.
type Claims struct {
	UUID, Vendor, Product, IP string
}

// seen records that machine mac asked for something, making an unknown
// machine's record (quarantined) while there is room, and lets the boot
// rules admit it. What a machine says of itself is kept only in a valid
// form.
func (r *Registry) seen(ctx context.Context, mac string, c Claims) (api.BootMachine, error) {
	c.UUID = strings.ToLower(c.UUID)
	if !uuidRE.MatchString(c.UUID) {
		c.UUID = ""
	}
	c.Vendor, c.Product = cleanClaim(c.Vendor), cleanClaim(c.Product)
	same := func(claim, have string) bool { return claim == "" || claim == have }
	m, err := r.Machine(ctx, mac)
	switch {
	case err == nil:
		if r.now().Sub(m.LastSeen) < seenEvery && same(c.UUID, m.UUID) && same(c.IP, m.IP) && same(c.Vendor, m.Vendor) && same(c.Product, m.Product) {
			return r.applyRules(ctx, m)
		}
	case !errors.Is(err, ErrNotFound):
		return api.BootMachine{}, err
	default:
		if n, err := r.Store.Count(ctx, "boot/machines/"); err != nil {
			return api.BootMachine{}, err
		} else if n >= int64(r.maxMachines()) {
			return api.BootMachine{}, fmt.Errorf("%w: %d machines are recorded: forget some ('vigil boot forget MAC')", ErrFull, n)
		}
	}
	m, err = r.update(ctx, mac, func(m *api.BootMachine) error {
		m.LastSeen = r.now()
		for _, f := range []struct{ claim, have *string }{{&c.UUID, &m.UUID}, {&c.IP, &m.IP}, {&c.Vendor, &m.Vendor}, {&c.Product, &m.Product}} {
			if *f.claim != "" {
				*f.have = *f.claim
			}
		}
		return nil
	})
	if err != nil {
		return m, err
	}
	return r.applyRules(ctx, m)
}

// Forget removes a machine's record and address lease: it is unknown
// again (quarantined at its next boot).
func (r *Registry) Forget(ctx context.Context, mac string) error {
	norm, err := NormalMAC(mac)
	if err != nil {
		return err
	}
	if _, err := r.Machine(ctx, norm); err != nil {
		return err
	}
	if err := r.forgetLease(ctx, norm); err != nil {
		return err
	}
	if m, err := r.Machine(ctx, norm); err == nil && m.HostName != "" {
		var idx hostNameIndex
		if _, err := r.Store.Get(ctx, hostNameKey(m.HostName), &idx); err == nil && idx.MAC == norm {
			r.Store.Delete(ctx, hostNameKey(m.HostName))
		}
	}
	return r.Store.Delete(ctx, machineKey(norm))
}

// stage records that machine mac reached a stage of its boot; a DHCP
// request from iPXE starts a new boot's timeline. Only machines already
// known are recorded (a DHCP client alone makes no record).
func (r *Registry) stage(ctx context.Context, mac string, set func(b *api.BootStages, now time.Time)) error {
	if _, err := r.Machine(ctx, mac); err != nil {
		return err
	}
	_, err := r.update(ctx, mac, func(m *api.BootMachine) error {
		if m.LastBoot == nil {
			m.LastBoot = &api.BootStages{}
		}
		set(m.LastBoot, r.now())
		return nil
	})
	return err
}

func (r *Registry) maxMachines() int {
	if r.MaxMachines > 0 {
		return r.MaxMachines
	}
	return MaxMachines
}
